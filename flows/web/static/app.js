// sopflow pages: the inbox refreshes its list without a full reload; the SOP editor checks the text
// as the administrator types. Nothing else needs script (every form works without it).
(function () {
  var box = document.getElementById("inbox");
  if (!box) return;
  var every = (parseFloat(box.getAttribute("data-every")) || 5) * 1000;
  function refresh() {
    fetch(box.getAttribute("data-refresh"), {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (r) {
        if (r.status === 401) { window.location.href = "/login?next=/inbox"; return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined && box.innerHTML !== html) {
          var focused = document.activeElement && box.contains(document.activeElement);
          if (!focused) { box.innerHTML = html; box.setAttribute("data-refreshed", String(Date.now())); }
        }
      })
      .catch(function () {});
  }
  setInterval(refresh, every);
})();

// The SOP editor (flows/web/templates/editor.html): line numbers, the server's problems next to
// their line (a marker in the gutter, the message beside the line, a list linking to the lines),
// and the JSON Schema's key names for the place the cursor is in.
(function () {
  var form = document.getElementById("sop-editor");
  if (!form) return;
  var text = document.getElementById("sop-text");
  var gutter = document.getElementById("gutter");
  var notes = document.getElementById("notes");
  var status = document.getElementById("check-status");
  var list = document.getElementById("problem-list");
  var namesList = document.getElementById("names-list");
  var namesPlace = document.getElementById("names-place");
  var fields = JSON.parse(document.getElementById("schema-fields").textContent || "{}");
  var problems = JSON.parse(document.getElementById("initial-problems").textContent || "[]");
  var msg = function (name, key, value) {
    var s = form.getAttribute("data-" + name) || "";
    return key ? s.split("{" + key + "}").join(String(value)) : s;
  };
  var timer = null, seq = 0;

  function lineCount() { return text.value.split("\n").length; }

  function byLine() {
    var out = {};
    problems.forEach(function (p) { if (p.line) { (out[p.line] = out[p.line] || []).push(p); } });
    return out;
  }

  function draw() {
    var n = lineCount(), bad = byLine();
    var g = document.createDocumentFragment(), t = document.createDocumentFragment();
    for (var i = 1; i <= n; i++) {
      var ln = document.createElement("div");
      ln.className = "ln" + (bad[i] ? " bad" : "");
      ln.setAttribute("data-line", i);
      ln.textContent = (bad[i] ? "\u25CF " : "") + i;
      if (bad[i]) ln.title = bad[i].map(function (p) { return p.message; }).join("\n");
      g.appendChild(ln);
      var note = document.createElement("div");
      note.className = "note" + (bad[i] ? " bad" : "");
      note.setAttribute("data-line", i);
      note.textContent = bad[i] ? bad[i].map(function (p) { return p.path + ": " + p.message; }).join(" · ") : "";
      if (bad[i]) note.title = note.textContent;
      t.appendChild(note);
    }
    gutter.replaceChildren(g);
    notes.replaceChildren(t);
    list.replaceChildren();
    problems.forEach(function (p) {
      var li = document.createElement("li");
      if (p.line) {
        var a = document.createElement("a");
        a.href = "#sop-text";
        a.setAttribute("data-line", p.line);
        a.textContent = msg("msg-line", "n", p.line);
        li.appendChild(a);
        li.appendChild(document.createTextNode(" "));
      }
      var span = document.createElement("span");
      span.className = "msg";
      span.textContent = p.text;
      li.appendChild(span);
      list.appendChild(li);
    });
    sync();
  }

  function sync() { gutter.scrollTop = text.scrollTop; notes.scrollTop = text.scrollTop; }

  function goTo(line) {
    var lines = text.value.split("\n"), start = 0;
    for (var i = 0; i < line - 1 && i < lines.length; i++) start += lines[i].length + 1;
    text.focus();
    text.setSelectionRange(start, start + (lines[line - 1] || "").length);
    var lh = parseFloat(getComputedStyle(text).lineHeight) || 20;
    text.scrollTop = Math.max(0, (line - 3) * lh);
    sync();
    offer();
  }

  function check() {
    var mine = ++seq;
    status.textContent = msg("msg-checking");
    var body = new URLSearchParams();
    body.set("csrf", form.querySelector("input[name=csrf]").value);
    body.set("text", text.value);
    fetch(form.getAttribute("data-check"), {method: "POST", body: body, credentials: "same-origin",
                                            redirect: "manual", headers: {"Accept": "application/json"}})
      .then(function (r) {
        if (r.type === "opaqueredirect") throw {};  // the session ended: a redirect to the sign-in page
        return r.json();
      })
      .then(function (data) {
        if (mine !== seq) return;  // a newer check is on its way
        if (!data.ok) throw {shown: data.error};
        problems = data.problems || [];
        if (data.fields) fields = data.fields;
        status.textContent = problems.length ? msg("msg-count", "n", problems.length) : msg("msg-ok");
        form.setAttribute("data-checked", String(mine));
        draw();
      })
      .catch(function (e) {
        if (mine === seq) status.textContent = msg("msg-failed") + (e && e.shown ? " " + e.shown : "");
      });
  }

  // The key names for the cursor's place: the chain of keys and list items above it, by indentation.
  function kindOf(itemRow, dashIndent, all) {
    for (var j = itemRow; j < all.length; j++) {
      var l = all[j];
      if (j > itemRow && l.trim() && !/^\s*#/.test(l) && l.search(/\S/) <= dashIndent) break;
      var m = l.match(/^(\s*)(- )?kind:\s*([a-z_]+)/);
      if (m && (m[1].length + (m[2] ? 2 : 0) === dashIndent + 2)) return m[3];
    }
    return null;
  }

  function place() {
    var all = text.value.split("\n");
    var before = text.value.slice(0, text.selectionStart).split("\n");
    var row = before.length - 1, cur = all[row];
    var chain = [], level, afterItem = false;
    var dashed = cur.match(/^(\s*)- /);
    if (dashed) {
      chain.push({item: true, row: row, indent: dashed[1].length});
      level = dashed[1].length;
      afterItem = true;
    } else {
      level = cur.trim() ? cur.search(/\S/) : before[row].length;
    }
    for (var i = row - 1; i >= 0 && (level > 0 || afterItem); i--) {
      var l = all[i];
      if (!l.trim() || /^\s*#/.test(l)) continue;
      var ind = l.search(/\S/);
      if (/^\s*- /.test(l)) {
        if (!afterItem && ind + 2 <= level) {
          chain.unshift({item: true, row: i, indent: ind});
          level = ind;
          afterItem = true;
        }
        continue;
      }
      if (ind < level || (afterItem && ind === level)) {
        chain.unshift({key: (l.match(/^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:/) || [])[1] || ""});
        level = ind;
        afterItem = false;
      }
    }
    var keys = chain.map(function (c) { return c.item ? "-" : c.key; });
    var field = {label: msg("place-field"), names: fields.field || []};
    var none = {label: msg("place-none"), names: []};
    if (!chain.length) return {label: msg("place-sop"), names: fields.sop || []};
    var f = keys.lastIndexOf("fields");
    if (keys[0] === "params") return keys.length === 2 ? field : none;
    if (keys[0] === "steps" && f > 0) return keys.length === f + 2 ? field : none;
    if (keys[0] === "steps" && keys.length === 2 && keys[1] === "-") {
      var kind = kindOf(chain[1].row, chain[1].indent, all);
      if (kind && fields["step." + kind]) return {label: msg("place-step", "kind", kind), names: fields["step." + kind]};
      var union = {};
      Object.keys(fields).forEach(function (k) {
        if (k.indexOf("step.") === 0) fields[k].forEach(function (n) { union[n] = 1; });
      });
      return {label: msg("place-anystep"), names: Object.keys(union).sort()};
    }
    return none;
  }

  // The word being typed where a key goes ("  - ki" → "ki"), to narrow the names and be replaced by one.
  function partial() {
    var line = text.value.slice(0, text.selectionStart).split("\n").pop();
    var m = line.match(/^\s*(?:- )?([A-Za-z_]*)$/);
    return m ? m[1] : "";
  }

  function offer() {
    var p = place(), typed = partial();
    var names = p.names.filter(function (n) { return n.indexOf(typed) === 0 && n !== typed; });
    if (!names.length) names = p.names;
    var key = p.label + "|" + names.join(",");
    if (namesList.getAttribute("data-key") === key) return;
    namesList.setAttribute("data-key", key);
    namesPlace.textContent = p.label;
    namesList.replaceChildren();
    names.forEach(function (name) {
      var li = document.createElement("li");
      var b = document.createElement("button");
      b.type = "button";
      b.className = "name";
      b.textContent = name;
      b.addEventListener("mousedown", function (e) { e.preventDefault(); });  // keep the cursor in the text
      b.addEventListener("click", function () {
        var cut = partial();
        if (name.indexOf(cut) === 0) text.setSelectionRange(text.selectionStart - cut.length, text.selectionEnd);
        insert(name + ": ");
      });
      li.appendChild(b);
      namesList.appendChild(li);
    });
  }

  function insert(s) {
    var a = text.selectionStart, b = text.selectionEnd;
    text.setRangeText(s, a, b, "end");
    text.focus();
    changed();
  }

  function changed() {
    draw();
    offer();
    clearTimeout(timer);
    timer = setTimeout(check, 400);
  }

  text.addEventListener("input", changed);
  text.addEventListener("scroll", sync);
  ["keyup", "click", "focus"].forEach(function (ev) { text.addEventListener(ev, offer); });
  text.addEventListener("keydown", function (e) {  // Tab indents by two spaces; Escape leaves the text
    if (e.key === "Tab" && !e.shiftKey && !e.ctrlKey && !e.altKey && !e.metaKey && form.getAttribute("data-tab") !== "off") {
      e.preventDefault();
      insert("  ");
    } else if (e.key === "Escape") {
      form.setAttribute("data-tab", "off");
    }
  });
  text.addEventListener("blur", function () { form.removeAttribute("data-tab"); });
  list.addEventListener("click", function (e) {
    var a = e.target.closest("a[data-line]");
    if (!a) return;
    e.preventDefault();
    goTo(parseInt(a.getAttribute("data-line"), 10));
  });
  gutter.addEventListener("click", function (e) {
    var ln = e.target.closest(".ln");
    if (ln) goTo(parseInt(ln.getAttribute("data-line"), 10));
  });
  draw();
  offer();
})();

// Signing takes seconds under load (the password hash, the record, the run resumed): once the form
// is sent, its buttons wait and a status line says what is happening. The form works without it.
(function () {
  var forms = document.querySelectorAll("form[data-busy]");
  Array.prototype.forEach.call(forms, function (form) {
    form.addEventListener("submit", function (event) {
      var by = event.submitter;
      if (by && by.value === "edit") return;
      if (form.getAttribute("data-sent")) { event.preventDefault(); return; }
      form.setAttribute("data-sent", "1");
      var busy = document.getElementById(form.getAttribute("data-busy"));
      if (busy) busy.hidden = false;
      Array.prototype.forEach.call(form.querySelectorAll("button"), function (b) {
        b.setAttribute("aria-busy", "true");
        if (b !== by) b.disabled = true;
      });
      if (by) { var keep = document.createElement("input"); keep.type = "hidden"; keep.name = by.name; keep.value = by.value; form.appendChild(keep); by.disabled = true; }
    });
  });
})();
