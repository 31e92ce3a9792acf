"""What `return_features` costs a decode step in the worker: the feature recorder's work for one step
of N generated tokens (encode through the whole SAE, top k, the copy to the host), on this machine's
CPU with the shipped SAE, beside the decode step it rides on.

    OMP_NUM_THREADS=2 python benchmarks/bench_record.py --step-ms 290
--step-ms: the server's decode step at that batch size (output tokens per step / steady tok/s, from
bench_serving's vanilla cells); prints one JSON line with the recorder's share of it.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from steer_plugin.core.config import DEFAULT_SAE_DIR
from steer_plugin.core.sae import SAE
from steer_plugin.core.spec import FeatureRecording
from steer_plugin.worker.recorder import FeatureRecorder
from steer_plugin.worker.step_layout import StepLayout


def per_step_ms(recorder: FeatureRecorder, sae: SAE, tokens: int, repeats: int) -> float:
    """Mean wall time of fill + record + landing for a decode step of `tokens` requests, each recording."""
    keys = [f"bench-{i:04d}-key" for i in range(tokens)]
    extra = {k: {"steer_record_features": FeatureRecording(key=k, sae="sae", top_k=4, scope="generation")
                 .model_dump_json()} for k in keys}
    stream = torch.randn(tokens, sae.cfg.d_in)
    times = []
    for step in range(repeats + 3):
        layout = StepLayout(keys, np.ones(tokens), np.full(tokens, 20 + step), np.full(tokens, 20),
                            lambda rid: extra[rid])
        start = time.perf_counter()
        recorder.fill(layout)
        recorder.record(sae, stream)
        recorder._land(wait=True)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.mean(times[3:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="8,32", help="generated tokens per step (the concurrency)")
    p.add_argument("--step-ms", default="110,290", help="the server's decode step at each, in ms")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    sae = SAE.load(DEFAULT_SAE_DIR)
    out = {"sae": DEFAULT_SAE_DIR.name, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "threads": torch.get_num_threads(),
           "steps": []}
    for tokens, step_ms in zip(map(int, args.tokens.split(",")), map(float, args.step_ms.split(","))):
        ms = per_step_ms(FeatureRecorder("sae"), sae, tokens, args.repeats)
        out["steps"].append({"tokens": tokens, "record_ms": round(ms, 2), "decode_step_ms": step_ms,
                             "share": round(ms / (ms + step_ms), 4)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
