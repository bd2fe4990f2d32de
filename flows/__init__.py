"""sopflow: hospital SOPs for cell-therapy doses, run as Prefect flows with signed human steps.

The package follows the data path: ``flows.sop`` (definitions) -> ``flows.engine`` (Prefect
flows) -> ``flows.record`` / ``flows.outputs`` (the quality record, documents, notifications)
-> ``flows.cli`` (the command line), with ``flows.service`` as the one service layer.
Importing ``flows`` imports nothing heavy.
"""

__version__ = "0.1.0"
