"""SOP change control (issue 6): version states, the built-in change-control SOP, training per
version, periodic review, export and import. The service layer for ``sopflow sop …``.

    control.py   establish, create_draft, submit_change, sweep, record_review, retire, effective_sop
    transfer.py  export_institution / import_institution: a folder of YAML with a manifest of hashes

The states and the signing rule live in ``flows.record.versions``; the readable diff in
``flows.sop.diff``; validation of YAML text for the editor in ``flows.sop.editing``.
"""
