"""SOP text in several languages (issue 14): ``title: {en: …, zh: …}`` on titles, labels, meanings;
the first one written is the text as a string (what the CLI, the record and the tests show),
``text_in`` picks a language, and a key that names no known language is a load error at its line."""

from __future__ import annotations

import pytest
import yaml

from flows.errors import SopDefinitionError
from flows.sop.load import load_sop
from flows.sop.model import LANGUAGES, Localized, SopDefinition, text_in
from flows.sop.schema import sop_json_schema
from tests.conftest import DEMO_SOP


def test_sop_translations_are_picked_by_language():
    sop = SopDefinition.model_validate(yaml.safe_load(DEMO_SOP.read_text(encoding="utf-8")))
    assert isinstance(sop.title, Localized)
    assert sop.title == "CAR-T dose receipt and acceptance"  # as written first: the CLI's text
    assert text_in(sop.title, "zh") == "CAR-T 产品到货接收与验收"
    assert text_in(sop.title, "fr") == "CAR-T dose receipt and acceptance"
    arrival = sop.step("arrival")
    assert text_in(arrival.fields["logger_max_c"].label, "zh") == "温度记录仪运输全程最高温度"
    assert text_in("plain", "zh") == "plain"
    assert text_in(None, "zh") == ""


def test_sop_translations_survive_a_copy():
    import copy
    import pickle

    sop = SopDefinition.model_validate(yaml.safe_load(DEMO_SOP.read_text(encoding="utf-8")))
    for again in (copy.deepcopy(sop), pickle.loads(pickle.dumps(sop)), sop.model_copy()):  # noqa: S301 (our own bytes)
        assert text_in(again.title, "zh") == "CAR-T 产品到货接收与验收"


def test_sop_translation_in_an_unknown_language_is_refused_at_its_line(tmp_path):
    text = DEMO_SOP.read_text(encoding="utf-8").replace("zh: CAR-T 产品到货接收与验收}", "fr: Réception}", 1)
    folder = tmp_path / "demo_hospital"
    folder.mkdir()
    for name in ("institution.yaml", "products.yaml"):
        (folder / name).write_text((DEMO_SOP.parent / name).read_text(encoding="utf-8"), encoding="utf-8")
    path = folder / "dose_receipt.yaml"
    path.write_text(text, encoding="utf-8")
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith("title:"))
    with pytest.raises(SopDefinitionError) as info:
        load_sop(path)
    assert f"dose_receipt.yaml:{line}: title:" in str(info.value)
    assert "'fr' is not one of en, zh" in str(info.value)


def test_sop_schema_offers_text_or_one_per_language():
    schema = sop_json_schema()
    text = str(schema)
    assert "'en': {'type': 'string'}" in text
    assert set(LANGUAGES) == {"en", "zh"}
