"""The service floor: every action the CLI and the web app offer, one module per noun.

    guard       sign-in, every "who may" rule, the one refuse-and-audit helper
    accounts    users, roles, account state, passwords, language, web sign-in and sign-out
    training    training records; overdue training
    runs        start a run, list runs, a run's quality record, deviations, chain of identity, audit
    signing     a step's form, previewing, signing, corrections
    inbox       what waits on a person, by urgency
    documents   a rendered document for a reader
    library     the SOP library, what a user may start, one SOP readably
    versions    SOP change control: establish, drafts, submit, periodic review, retire
    editor      the web's SOP editor, versions and diff pages
    transfer    export and import of an institution's SOPs; the diff of two versions
    sweeps      the change-control sweep (a periodic job of the worker)
    server      the local Prefect server and the worker process: start, stop, status
    worker      the worker process: the engine's executor with every floor's periodic jobs

Layers, lowest first (imports point down only; tests/test_layers.py reads every import):
``flows.sop`` ← ``flows.record`` / ``flows.outputs`` ← ``flows.engine`` ← ``flows.services`` ←
``flows.cli`` / ``flows.web``. Views stay thin: they parse input, call one function here and
format its result or its error; no business rule lives in a command or a page. Importing this
package imports nothing (each module is imported where it is used).
"""
