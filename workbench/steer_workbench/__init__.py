"""The offline tools of steer_plugin: what makes the files an SAE is served with, and the reports
that say how well it steers. A distribution of its own: it imports steer_plugin (the SAE formats,
the catalogue and concept files, the plugin its engines load), and steer_plugin never imports it.

- Training (`python -m steer_workbench --help`): corpus -> residual capture -> TopK or BatchTopK SAE
  -> evaluation, feature statistics and catalogue (package_text, corpus, chat_corpus, capture,
  trainer, evaluate, catalogue, output_labels, output_score).
- Calibration, through the real engine (offline_engine, steering_eval): recommended strengths
  (strengths), concept clamps (concepts), difference-of-means vectors (diff_means), the layer scan
  (layer_scan), and the efficacy and comparison reports (efficacy, efficacy_report).

The imports form a DAG: protocols (the experiments' shared constants) and directions (the concepts'
directions file) sit below the tools that share them, and a tool that runs others' measurements
imports them, never the other way round.
"""
