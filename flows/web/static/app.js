// sopflow pages: the inbox refreshes its list without a full reload. Nothing else needs script.
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
