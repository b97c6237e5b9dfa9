"""A new backbone family is three files: its adapter (spatialmerge/adapters/<family>.py), its
builder (spatialmerge/models/<family>.py) and a model yaml (configs/model/<name>.yaml). This
test writes all three for a toy family, the way docs/contributing.md describes,
and runs it through patch, describe_schedule and eval's pipeline."""

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

import spatialmerge
from spatialmerge.adapters import Adapter, registry
from spatialmerge.adapters.loops import run_prefixed_blocks
from spatialmerge.models import ModelInfo, build_model, info, register_model
from spatialmerge.models import registry as model_registry
from spatialmerge.pipeline import run_evaluation
from tests.pipeline.test_configs import CONFIGS


class ToyViT(nn.Module):
    """A backbone no adapter knows: CLS + a patch grid through timm blocks."""

    def __init__(self, img_size: int = 64, dim: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=8, embed_dim=dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.patch_embed.num_patches, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads=2) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.num_prefix_tokens = 1
        self.global_pool = "token"

    def embed(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward_features(self, x: Tensor) -> Tensor:
        return self.norm(self.blocks(self.embed(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x[:, 0]


# 1. the adapter: how the family runs its blocks (timm's patch_embed, so the defaults fit the rest)
def _merging_forward_features(self: ToyViT, x: Tensor) -> Tensor:
    run = getattr(self, registry.STATE_ATTR).run(self)
    tokens, _ = run_prefixed_blocks(
        run, self.embed(x), self.patch_embed.grid_size, 1, self.blocks,
        lambda block, tokens, bias, rope: block(tokens) if bias is None else block(tokens, bias),
    )
    return self.norm(tokens)


class ToyAdapter(Adapter):
    name = "toy"
    model_types = (ToyViT,)

    def overrides(self):
        return {"forward_features": _merging_forward_features}


# 2. the builder
def build_toy(checkpoint, **overrides) -> ToyViT:
    model = ToyViT(**overrides)
    if checkpoint is not None:
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
    return model.eval()


# 3. the model yaml
MODEL_YAML = """# @package _global_
defaults:
  - override /evaluator: fidelity
  - override /dataset: photos
model:
  _target_: spatialmerge.models.build_model
  name: toy_s
  checkpoint: null
"""


def test_a_family_in_three_pieces_runs_patch_describe_and_eval(tmp_path, monkeypatch):
    # registries as they are, restored after the test
    monkeypatch.setattr(registry, "_ADAPTERS", list(registry._ADAPTERS))
    monkeypatch.setattr(model_registry, "_BUILDERS", dict(model_registry._BUILDERS))
    monkeypatch.setattr(info, "_MODELS", dict(info._MODELS))
    registry.register_adapter(ToyAdapter())
    register_model(
        ModelInfo("toy_s", "toy", "features", 64, 8, 1, None, "toy.pt", "this test", None), build_toy
    )
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "toy_s.yaml").write_text(MODEL_YAML)

    model = build_model("toy_s")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        unmerged = model.forward_features(x)
        spatialmerge.patch(model, "cubist", ratio=0.25, recover=True)  # 8x8 -> 6x6 before block 1
        merged = model.forward_features(x)
    assert spatialmerge.describe_schedule(model, "cubist", ratio=0.25)["stages"] == [
        {"loc": 1, "r_h": 2, "r_w": 2, "grid_in": [8, 8], "grid_out": [6, 6]}
    ]
    assert merged.shape == unmerged.shape and not torch.allclose(merged, unmerged)
    spatialmerge.unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), unmerged, rtol=0, atol=0)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[
            f"hydra.searchpath=[file://{tmp_path}]", "model=toy_s", "merge.ratio=0.25",
            "dataset.names=[astronaut]", "evaluator.fidelity.num_workers=0",
        ])
    outcome = run_evaluation(cfg)
    assert outcome["merge"]["loc"] == 1 and outcome["schedule"]["tokens_out"] == 36
    fidelity = outcome["metrics"]["fidelity"]
    assert fidelity["kind"] == "features" and fidelity["images"] == 1
    assert 0 < fidelity["feature_cosine"] < 1
    assert OmegaConf.select(cfg, "model.name") == "toy_s"
