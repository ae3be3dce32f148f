"""The quality lab: every technique scored on two small trained models (an SD1-layout and an
SDXL-layout UNet), on data whose quality a program can judge.

- shapes.py: the data (one object: shape, colour, position), drawn from a seed at any size;
- score.py: what an image shows (object count, colour, shape, position);
- models.py: the lab models (their ldm configs, prompt tokens, weights with checksum);
- train.py: trains a lab model from nothing (`python -m lib_unetmods.lab.quality.train`);
- rows.py: the rows, declared (settings, scale, reference, default set or --all);
- sampling.py: a row on a model, through `apply_mods` as in the WebUI; the lab's probes;
- stats.py: shares with Wilson intervals, distances, CPU-time speed-ups;
- run.py: rows interleaved chunk by chunk with the unpatched model; the expected time;
- output.py: the table (models side by side), chart, pictures, the README's table block;
- cli.py: the command line (`python -m lib_unetmods.quality`).
"""
