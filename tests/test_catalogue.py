"""The product catalogue of the SOP library and the language of controlled documents (no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.errors import SopDefinitionError
from flows.sop.check import template_name
from flows.sop.load import load_institution_file, load_products_file

REPO = Path(__file__).resolve().parent.parent
INSTITUTIONS = ("demo_hospital", "shenjiang_hospital")
CHINA = ("axi_cel", "relma_cel", "eque_cel", "inati_cel", "zevor_cel")
US = ("kymriah", "yescarta", "tecartus", "breyanzi", "abecma", "carvykti")


@pytest.mark.parametrize("inst", INSTITUTIONS)
def test_catalogue_lists_every_product_of_the_domain_brief(inst: str) -> None:
    products = load_products_file(REPO / "sops" / inst / "products.yaml").products

    assert set(products) == set(CHINA) | set(US)
    for pid in CHINA:  # no China label was found: the limits must be set by the institution
        assert {"storage_max_c", "thaw_to_infusion_max_min"} <= set(products[pid].unconfirmed), pid
    assert products["abecma"].thaw_clock_from == "thaw_start"
    assert products["abecma"].thaw_to_infusion_max_min == 60
    assert (products["tecartus"].storage_max_c, products["tecartus"].unconfirmed) == (-150, ())
    assert products["carvykti"].thaw_to_infusion_max_min == 150
    for pid, spec in products.items():
        for key in ("storage_max_c", "thaw_to_infusion_max_min"):
            assert getattr(spec, key) is not None or key in spec.unconfirmed, f"{pid}.{key} is neither set nor marked"


def test_unconfirmed_must_name_a_product_key(tmp_path: Path) -> None:
    path = tmp_path / "products.yaml"
    path.write_text(
        "schema_version: 1\nproducts:\n  x:\n    name: X\n    mah: M\n    unconfirmed: [storage_max_c, thaw_limit]\n",
        encoding="utf-8",
    )

    with pytest.raises(SopDefinitionError) as info:
        load_products_file(path)

    text = str(info.value)
    assert "products.yaml:3" in text or "products.yaml:4" in text or "products.yaml:6" in text
    assert "'thaw_limit'" in text
    assert "not a product key" in text
    assert "storage_max_c" in text  # the keys it could have named


def test_institutions_choose_their_document_language() -> None:
    langs = {inst: load_institution_file(REPO / "sops" / inst / "institution.yaml").language for inst in INSTITUTIONS}

    assert langs == {"demo_hospital": "en", "shenjiang_hospital": "zh"}


def test_template_name_prefers_the_language_and_the_institution(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    (root / "north").mkdir(parents=True)
    for name in ("record.html.j2", "record.zh.html.j2", "north/record.en.html.j2", "plain.html.j2"):
        (root / name).write_text("x", encoding="utf-8")

    assert template_name("record.html.j2", root, "south", "zh") == "record.zh.html.j2"
    assert template_name("record.html.j2", root, "south", "en") == "record.html.j2"  # no English file: the name itself
    assert template_name("record.html.j2", root, "north", "en") == "record.en.html.j2"  # the institution's override
    assert template_name("plain.html.j2", root, "south", "zh") == "plain.html.j2"
    assert template_name("absent.html.j2", root, "south", "zh") is None
    assert template_name("record.html.j2", root, "south", None) == "record.html.j2"
