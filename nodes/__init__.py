"""ComfyUI glue of EmoCAST (V3 schema); model math lives in emocast_lib. The node list is in
`extension`, so the ComfyUI-free helpers (`types`, `convert`) import without ComfyUI."""
