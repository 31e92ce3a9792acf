"""The training pipeline's catalogue (transformers capture, sinks left out, feature_statistics,
build_catalogue) over the first N documents of a corpus file, for steer-catalogue compare."""
import json
import sys
import time

from steer_plugin.core.config import DEFAULT_SAE_DIR, default_model_dir
from steer_plugin.core.sae import SAE
from steer_plugin.search.catalogue import write_entries
from steer_workbench.capture import capture, load_hf_model
from steer_workbench.catalogue import build_catalogue, feature_statistics

corpus, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
docs = [json.loads(line)["text"] for line in open(corpus)][:n]
started = time.time()
model, tokenizer = load_hf_model(str(default_model_dir()))
cap = capture(model, tokenizer, docs, 15, 512, 8).without_sinks()
sae = SAE.load(DEFAULT_SAE_DIR)
stats, top_vals, top_rows = feature_statistics(sae, cap)
rows = top_rows.numpy()
entries = build_catalogue(tokenizer, cap.tokens, stats, top_vals, cap.doc[rows], cap.pos[rows])
write_entries(out, entries)
print(json.dumps({"documents": len(docs), "tokens": int(cap.acts.shape[0]), "seconds": round(time.time() - started, 1)}))
