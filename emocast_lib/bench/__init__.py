"""Developer tooling, kept out of the Comfy Registry archive: the speed and memory benchmark
(`python -m emocast_lib.bench`), the deterministic fill rule and the tiny stand-in models that the bench,
the tests and `python -m emocast_lib make-tiny-models` run on."""
