"""sopflow: hospital SOPs for cell-therapy doses, run as Prefect flows with signed human steps.

The package is layered along the data path, lowest first; every import points down
(``tests/test_layers.py``)::

    flows.sop                  definitions: YAML -> frozen SopDefinition (no Prefect, no database)
    flows.record, flows.outputs  the quality record (ledger, state, queries); documents, notifications
    flows.engine               the one Prefect flow, opening runs, gates, sub-runs, the executor
    flows.services             the one service floor: a module per noun, one guard for who may do what
    flows.cli, flows.web       the command line and the web app, thin over the floor

``flows.errors`` and ``flows.config`` sit below them all. Importing ``flows`` imports nothing heavy.
"""

__version__ = "0.1.0"
