"""A ClientApp mod that records every message in and out, for the data-leaves-nothing audit.

Enabled only when the run config names an ``audit-dir``. It records structure, not
values: each record's kind, array names and shapes, and config/metric keys with their
values when they are scalars or strings, so a test can check what crossed the wire.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from edgemri.core.io import write_json


def describe_message(msg: Message) -> dict[str, Any]:
    if msg.has_error():
        return {"error": msg.error.reason}
    records: dict[str, Any] = {}
    for key, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            records[key] = {"type": "arrays",
                            "arrays": {name: list(arr.shape) for name, arr in record.items()}}
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            records[key] = {"type": "config" if isinstance(record, ConfigRecord) else "metrics",
                            "values": {k: v for k, v in record.items()}}
        else:
            records[key] = {"type": type(record).__name__}
    return {"message_type": msg.metadata.message_type, "records": records}


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    audit_dir = str(context.run_config.get("audit-dir", ""))
    reply = call_next(msg, context)
    if audit_dir:
        path = Path(audit_dir) / f"node-{context.node_id}-{time.time_ns()}-{os.getpid()}.json"
        write_json(path, {"in": describe_message(msg), "out": describe_message(reply)})
    return reply
