"""What users would write instead of Inflow, for `inflow bench pipeline` to measure against.

Two Faust agents as a user would write them from the libraries' own documentation, with the
same torch fp32 model Inflow's engines are built from (the reference model, no ONNX):
  per-event: one text at a time, tokenizer + model called on the event loop;
  take:      `stream.take(16, within=0.01)` batches, padded to their longest text.
Both publish a JSON prediction (label, scores, embedding) per event with stdlib `json` and do
not index into Elasticsearch (which favours them). Bench code, never part of the worker.

Run as `python -m streams.cli.bench.baselines MODE BOOTSTRAP IN_TOPIC OUT_TOPIC GROUP DATADIR`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

MODES = ("per-event", "take")
TAKE_BATCH = 16
TAKE_WITHIN_S = 0.01


def build_app(
    mode: str, bootstrap: str, in_topic: str, out_topic: str, group: str, datadir: str
) -> Any:
    import faust
    import torch
    from transformers import PreTrainedTokenizerFast

    from engines.builder.model import load_serving_model
    from engines.builder.pipeline import resolve_model
    from engines.modeldir import TOKENIZER_FILE

    info = resolve_model(None, progress=False, echo=lambda _m: None)
    model = load_serving_model(info)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(info.path / TOKENIZER_FILE), pad_token="[PAD]"
    )
    labels = list(info.labels)

    def classify(texts: list[str]) -> list[dict[str, Any]]:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            probs, emb = model(enc["input_ids"], enc["attention_mask"])
        out = []
        for p, e in zip(probs.tolist(), emb.tolist(), strict=True):
            best = max(range(len(labels)), key=lambda i: p[i])
            out.append(
                {"label": labels[best], "scores": dict(zip(labels, p, strict=True)), "embedding": e}
            )
        return out

    app = faust.App(
        group,
        broker=f"kafka://{bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        consumer_auto_offset_reset="earliest",
        topic_disable_leader=True,
        web_enabled=False,
        store="memory://",
        datadir=datadir,
        logging_config=None,
    )
    source = app.topic(in_topic, key_serializer="raw", value_serializer="raw")
    sink = app.topic(out_topic, key_serializer="raw", value_serializer="raw")

    async def publish(event: dict[str, Any], prediction: dict[str, Any]) -> None:
        body = {"id": event.get("id"), "text": event["text"], **prediction}
        await sink.send(key=str(event.get("id")).encode(), value=json.dumps(body).encode())

    if mode == "per-event":

        @app.agent(source)
        async def per_event(stream: Any) -> None:
            async for value in stream:
                event = json.loads(value)
                await publish(event, classify([event["text"]])[0])

    else:

        @app.agent(source)
        async def batched(stream: Any) -> None:
            async for values in stream.take(TAKE_BATCH, within=TAKE_WITHIN_S):
                events = [json.loads(v) for v in values]
                predictions = classify([e["text"] for e in events])
                for event, prediction in zip(events, predictions, strict=True):
                    await publish(event, prediction)

    return app


def main(argv: list[str]) -> int:
    import faust

    mode, bootstrap, in_topic, out_topic, group, datadir = argv
    if mode not in MODES:
        raise SystemExit(f"mode must be one of {', '.join(MODES)}")
    app = build_app(mode, bootstrap, in_topic, out_topic, group, datadir)
    worker = faust.Worker(app, loglevel="warning", override_logging=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
