"""The test suite's one tiny model config (importable from every test folder)."""

# The suite's one tiny model: a ViT at 32 px, patch 8, 2 blocks of width 32, and heads to match.
# Every tiny config of the suite starts from it (tiny_config, the shared runs of tests/eval and
# tests/test_runs.py, the engine's TINY); a test that needs other values overrides them after it.
TINY_MODEL = [
    "backbone.name=vit_tiny_patch16_224",
    "backbone.img_size=32",
    "backbone.patch_size=8",
    "backbone.kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
    "tasks.mlc.dim=32",
    "tasks.mlc.num_heads=2",
    "tasks.mlc.ffn_dim=64",
    "tasks.mlc.num_layers=1",
    "tasks.swav.hidden_dim=64",
    "tasks.swav.out_dim=16",
    "tasks.swav.num_prototypes=8",
    "tasks.swav.freeze_prototypes_iters=0",
    "tasks.mim.mask_patch_size=16",
]
