"""`python -m emocast_lib {generate,make-tiny-models,convert,batch} ...` (parsed in cli.py)."""
import sys

FIRST_LINE = {"generate": "EmoCAST generate: checking the inputs (no model loads before they pass) ...",
              "make-tiny-models": "make-tiny-models: writing tiny TEST models ...",
              "batch": "EmoCAST batch: checking every job (no model loads before they pass) ..."}

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] in FIRST_LINE and not {"-h", "--help"} & set(argv):
        print(FIRST_LINE[argv[0]], flush=True)  # before torch and the models' libraries are imported
    from .cli import main

    sys.exit(main())
