"""Discovery and calibration for any model and SAE the plugin serves (the `steer-catalogue` command,
cli.py): build a catalogue from a corpus through the plugin's own recording path (build.py,
top_features.py, corpus_file.py), bring in labels people already have (labels.py), and measure
recommended strengths and concept clamps on the model's own replies (calibrate.py). What they write
is the schema the server reads (steer_plugin/core/catalogue_schema.py)."""
