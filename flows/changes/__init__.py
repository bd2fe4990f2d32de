"""SOP change control (issue 6): version states, the built-in change-control SOP, training per
version, periodic review, export and import. The service layer for ``sopflow sop …``.

    control.py   establish, create_draft, submit_change, record_review, retire, effective_sop, list_versions
    sweep.py     sweep (the executor's): issue approved versions, assign training, make due ones Effective, remind
    transfer.py  export_institution / import_institution: a folder of YAML with a manifest of hashes

The states and the signing rule live in ``flows.record.versions``; the readable diff in
``flows.sop.diff``; validation of YAML text for the editor in ``flows.sop.editing``.
"""
