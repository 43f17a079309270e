"""The model library: shapes, padding, the HyperMixing formula, tying, gradients, config, save/load."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hypermixer import (
    MIXERS,
    EncoderConfig,
    ForMaskedLM,
    ForSequenceClassification,
    HyperMixing,
    flops_per_token,
)
from hypermixer.hf.release import release_code
from hypermixer.mixers import hypermixing

VOCAB = 500


def tiny(mixer: str, **overrides) -> EncoderConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_seq_len=40)
    return EncoderConfig.from_dict({**base, "mixer": mixer, **overrides})


def batch(b=3, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, VOCAB, (b, n), generator=g)


@pytest.mark.parametrize("mixer", MIXERS)
def test_shapes(mixer):
    torch.manual_seed(0)
    ids = batch()
    mask = torch.ones_like(ids)
    mlm = ForMaskedLM(tiny(mixer))
    assert mlm(ids, mask).logits.shape == (3, 12, VOCAB)
    labels = torch.full_like(ids, -100)
    labels[:, [1, 4]] = ids[:, [1, 4]]
    out = mlm(ids, mask, labels=labels)
    assert out.logits.shape == (6, VOCAB) and out.num_masked == 6
    assert out.loss.ndim == 0 and 0.0 <= out.accuracy.item() <= 1.0
    clf = ForSequenceClassification(tiny(mixer), num_labels=3)
    assert clf(ids, mask, torch.zeros_like(ids)).logits.shape == (3, 3)
    reg = ForSequenceClassification(tiny(mixer), num_labels=1)
    out = reg(ids, mask, labels=torch.randn(3))
    assert out.logits.shape == (3, 1) and out.loss.ndim == 0


# FNet is not padding-invariant: its DFT along the sequence has length N, so appending padding changes
# every frequency, and so every output, even with the padded inputs zeroed.
@pytest.mark.parametrize("mixer", ["hypermixer", "transformer", "mlpmixer"])
@pytest.mark.parametrize("pooling, layout", [("mean", "pre"), ("cls", "pre"), ("mean", "post")])
def test_appended_padding_leaves_real_positions_unchanged(mixer, pooling, layout):
    torch.manual_seed(0)
    model = ForSequenceClassification(tiny(mixer, pooling=pooling, norm_position=layout)).eval()
    ids = batch(b=2, n=10)
    padded = torch.cat([ids, torch.zeros(2, 7, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 7)], dim=1)
    with torch.no_grad():
        hidden = model.encoder(ids, torch.ones(2, 10))
        hidden_padded = model.encoder(padded, mask)
        torch.testing.assert_close(hidden_padded[:, :10], hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            model(padded, mask).logits, model(ids, torch.ones(2, 10)).logits, rtol=1e-5, atol=1e-5
        )


def test_fnet_is_not_padding_invariant():
    torch.manual_seed(0)
    model = ForMaskedLM(tiny("fnet")).eval()
    ids = batch(b=1, n=10)
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=ids.dtype)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1)
    with torch.no_grad():
        diff = (model.encoder(padded, mask)[:, :10] - model.encoder(ids)).abs().max()
    assert diff > 1e-3


def reference_weights(module: HyperMixing) -> dict[str, torch.Tensor]:
    """Copies of the optimized layer's parameters, as fresh leaves, for the reference to use and differentiate."""
    return {name: p.detach().clone().requires_grad_(True) for name, p in module.named_parameters()}


def naive_hypermixing(module: HyperMixing, weights: dict, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The formula, one example and one head at a time: TM(X) = W2 · GELU(W1ᵀ · X), W = h(X + P), on each
    example's real tokens only (so padding cannot matter), then the output LayerNorm if the module has one."""
    heads, size = module.num_heads, module.head_size
    w2_net = "hyper_w1" if module.tied else "hyper_w2"

    def hypernet(net, z, h):
        hidden = F.gelu(z @ weights[f"{net}.fc1_weight"][h] + weights[f"{net}.fc1_bias"][h, 0])
        return hidden @ weights[f"{net}.fc2_weight"][h] + weights[f"{net}.fc2_bias"][h, 0]

    rows = []
    for b, n in enumerate(lengths):
        tokens = x[b, :n]
        dim = tokens.shape[1]
        positions = torch.zeros(n, dim, dtype=x.dtype)
        for pos in range(n):
            for i in range(0, dim, 2):
                angle = pos / (10000 ** (i / dim))
                positions[pos, i] = math.sin(angle)
                positions[pos, i + 1] = math.cos(angle)
        z = tokens + positions
        per_head = []
        for h in range(heads):
            cols = slice(h * size, (h + 1) * size)
            w1 = hypernet("hyper_w1", z[:, cols], h)
            w2 = hypernet(w2_net, z[:, cols], h)
            per_head.append(w2 @ F.gelu(w1.T @ tokens[:, cols]))
        rows.append(torch.cat([torch.cat(per_head, dim=1), torch.zeros(x.shape[1] - n, dim, dtype=x.dtype)]))
    out = torch.stack(rows)  # padded rows mix nothing: zero (LayerNorm then makes them its bias)
    if module.norm is not None:
        out = F.layer_norm(out, (out.shape[-1],), weights["norm.weight"], weights["norm.bias"], module.norm.eps)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_hypermixing_equals_naive_loop(tied):
    torch.manual_seed(0)
    config = tiny(
        "hypermixer",
        hypermixer_tied=tied,
        hypermixer_layer_norm=False,
        hypermixer_hypernet_hidden_size=24,
        hypermixer_token_mixing_size=16,
    )
    module = HyperMixing(config).double()
    lengths = [9, 5, 7]
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    got = module(x, mask)
    want = naive_hypermixing(module, reference_weights(module), x, lengths)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got[b, :n], want[b, :n], rtol=1e-10, atol=1e-10)
        assert torch.all(got[b, n:] == 0)  # padded query rows are masked out of W2


@pytest.mark.parametrize("block_tokens", [None, 4, 25])  # one block; sequences cut in 3; two sequences a block
@pytest.mark.parametrize("tied", [False, True])
def test_hypermixing_gradients_match_the_reference_in_fp32(tied, block_tokens, monkeypatch):
    # The layer's backward is hand-written (it recomputes W1, W2 and the hypernetworks block by block of tokens
    # instead of storing them): its gradients for the input and every parameter must be the reference's.
    if block_tokens:
        monkeypatch.setattr(hypermixing, "TOKENS_PER_BLOCK", block_tokens)
    torch.manual_seed(0)
    config = tiny(
        "hypermixer", hypermixer_tied=tied, hypermixer_hypernet_hidden_size=24, hypermixer_token_mixing_size=16
    )
    module = HyperMixing(config)
    with torch.no_grad():  # non-trivial output LayerNorm parameters, so that their gradients are checked too
        module.norm.weight.normal_(1.0, 0.2)
        module.norm.bias.normal_(0.0, 0.2)
    weights = reference_weights(module)
    lengths = [11, 6, 9]
    x = torch.randn(3, 11, 32)
    mask = torch.arange(11)[None, :] < torch.tensor(lengths)[:, None]
    upstream = torch.randn(3, 11, 32)
    x_got, x_want = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = module(x_got, mask)
    want = naive_hypermixing(module, weights, x_want, lengths)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    tolerance = dict(rtol=1e-4, atol=1e-5)  # fp32: the two sum the same terms in different orders
    torch.testing.assert_close(got, want, **tolerance)
    torch.testing.assert_close(x_got.grad, x_want.grad, **tolerance)
    assert torch.all(x_got.grad[1, 6:] == 0) and torch.all(x_got.grad[2, 9:] == 0)  # padding gets no gradient
    params = dict(module.named_parameters())
    assert params.keys() == weights.keys() and len(params) == (6 if tied else 10)  # 4 per hypernetwork, LayerNorm 2
    for name, param in params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, weights[name].grad, **tolerance, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("block_tokens", [None, 3])  # whole batch in one block; sequences cut in 2
@pytest.mark.parametrize("position", ["sinusoidal", "learned", "none"])
@pytest.mark.parametrize("mixing", ["untied", "tied", "cross"])
def test_hypermixing_backward_passes_gradcheck(position, mixing, block_tokens, monkeypatch):
    # Finite differences in fp64 against the hand-written backward, in every mode: tied or not, each kind of
    # positions (learned ones get a gradient), cross-mixing (the query gets one), with padding on both sides.
    if block_tokens:
        monkeypatch.setattr(hypermixing, "TOKENS_PER_BLOCK", block_tokens)
    torch.manual_seed(0)
    config = EncoderConfig.from_dict(
        dict(
            vocab_size=VOCAB,
            hidden_size=8,
            num_layers=1,
            num_heads=2,
            intermediate_size=16,
            max_seq_len=10,
            mixer="hypermixer",
            hypermixer_tied=mixing == "tied",
            hypermixer_position=position,
            hypermixer_hypernet_hidden_size=6,
            hypermixer_token_mixing_size=4,
        )
    )
    module = HyperMixing(config).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    query = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True) if mixing == "cross" else None
    query_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool() if mixing == "cross" else None
    inputs = (x, *module.parameters()) + ((query,) if query is not None else ())
    assert torch.autograd.gradcheck(lambda *_: module(x, mask, query, query_mask), inputs)


def test_tied_hypermixing_shares_parameters_and_refuses_cross_mixing():
    untied = HyperMixing(tiny("hypermixer"))
    tied = HyperMixing(tiny("hypermixer", hypermixer_tied=True))
    assert tied.hyper_w2 is None
    n_untied = sum(p.numel() for p in untied.parameters())
    n_tied = sum(p.numel() for p in tied.parameters())
    assert n_untied - n_tied == sum(p.numel() for p in untied.hyper_w2.parameters())
    x = torch.randn(2, 7, 32)
    assert tied(x, torch.ones(2, 7)).shape == (2, 7, 32)  # the reference's tied path fails on real tensors
    with pytest.raises(ValueError, match="tied"):
        tied(x, query=torch.randn(2, 3, 32))
    assert untied(x, torch.ones(2, 7), query=torch.randn(2, 3, 32), query_mask=torch.ones(2, 3)).shape == (2, 3, 32)


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_reach_every_parameter(mixer):
    torch.manual_seed(0)
    overrides = {"hypermixer_position": "learned"} if mixer == "hypermixer" else {}
    for model in (
        ForMaskedLM(tiny(mixer, **overrides)),
        ForSequenceClassification(tiny(mixer, **overrides), num_labels=2),
        ForMaskedLM(tiny(mixer, norm_position="post", **overrides)),
    ):
        ids = batch()
        mask = torch.ones_like(ids)
        if isinstance(model, ForMaskedLM):
            labels = torch.full_like(ids, -100)
            labels[:, ::3] = ids[:, ::3]
            loss = model(ids, mask, labels=labels).loss
        else:
            segments = torch.zeros_like(ids)
            segments[:, 6:] = 1
            loss = model(ids, mask, segments, labels=torch.tensor([0, 1, 1])).loss
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, f"{mixer}: no gradient for {missing}"


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"hidden_sise": 32}, "hidden_sise"),
        ({"num_heads": 5}, "num_heads"),
        ({"num_layers": 0}, "num_layers"),
        ({"hidden_size": -8}, "hidden_size"),
        ({"intermediate_size": 2.5}, "intermediate_size"),
        ({"mixer": "lstm"}, "mixer"),
        ({"hypermixer_token_mixing_size": 30}, "hypermixer_token_mixing_size"),
        ({"dropout": 1.5}, "dropout"),
        ({"norm_position": "middle"}, "norm_position"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        overrides = dict(overrides)
        tiny(overrides.pop("mixer", "hypermixer"), **overrides)


def test_presets():
    base = EncoderConfig.preset("base")
    assert (base.hidden_size, base.num_layers, base.num_heads) == (768, 12, 12)
    assert EncoderConfig.preset("tiny", mixer="fnet").mixer == "fnet"
    with pytest.raises(ValueError, match="preset"):
        EncoderConfig.preset("huge")


@pytest.mark.parametrize("mixer, layout", [(m, "pre") for m in MIXERS] + [("transformer", "post")])
def test_save_load_round_trip_is_bit_identical(tmp_path, mixer, layout):
    torch.manual_seed(0)
    model = ForMaskedLM(tiny(mixer, hypermixer_tied=True, norm_position=layout)).eval()
    model.save_pretrained(tmp_path)
    # + the code Hugging Face's Auto classes load (generated from the library: tests/test_hf.py)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", "model.safetensors", *release_code()])
    loaded = ForMaskedLM.from_pretrained(tmp_path).eval()
    ids = batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # A classifier starts from the MLM release's encoder, bit for bit.
    clf = ForSequenceClassification.from_pretrained(tmp_path, num_labels=3).eval()
    with torch.no_grad():
        assert torch.equal(clf.encoder(ids), model.encoder(ids))
    clf.save_pretrained(tmp_path / "clf")
    again = ForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    assert again.num_labels == 3
    with torch.no_grad():
        assert torch.equal(again(ids).logits, clf(ids).logits)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ForMaskedLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ForMaskedLM.from_pretrained(tmp_path)
    ForMaskedLM(tiny("hypermixer")).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["encoder"]["num_heads"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="num_heads"):
        ForMaskedLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("mixer", MIXERS)
def test_mlm_loss_at_init_is_close_to_log_vocab(mixer):
    torch.manual_seed(0)
    vocab = 8000
    config = EncoderConfig.preset("tiny", mixer=mixer, vocab_size=vocab)
    model = ForMaskedLM(config).eval()
    ids = torch.randint(5, vocab, (8, 64))
    labels = torch.full_like(ids, -100)
    labels[:, ::5] = ids[:, ::5]
    with torch.no_grad():
        loss = model(ids, labels=labels).loss.item()
    assert abs(loss - math.log(vocab)) < 0.5, loss


def test_flops_per_token():
    hyper = EncoderConfig.preset("base", mixer="hypermixer")
    attention = EncoderConfig.preset("base", mixer="transformer")
    # HyperMixer's per-token cost does not depend on the length; attention's grows linearly with it.
    assert flops_per_token(hyper, 128) == flops_per_token(hyper, 4096)
    grow = flops_per_token(attention, 4096) - flops_per_token(attention, 2048)
    assert grow == pytest.approx(3 * 12 * 4 * 2048 * 768)
    # Multi-head hypernetworks (d/H -> d/H -> d'/H per head) cost less than attention's four d x d projections.
    assert flops_per_token(hyper, 128) < flops_per_token(attention, 128)
    for mixer in MIXERS:
        assert flops_per_token(EncoderConfig.preset("tiny", mixer=mixer), 128, mlm_fraction=0.15) > 0


def test_model_library_imports_no_pipeline_dependency():
    code = (
        "import sys, hypermixer; "
        "bad = [m for m in ('deepspeed', 'datasets', 'webdataset', 'wandb', 'submitit', 'data_pipeline', "
        "'pretrain', 'finetune', 'slurm', 'transformers') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("mixer", ["hypermixer", "transformer"])
def test_static_prediction_slots_match_the_exact_head_and_compile_whole(mixer):
    from hypermixer import max_predictions_per_seq
    from hypermixer.mixers.hypermixing import sinusoidal_positions

    torch.manual_seed(0)
    model = ForMaskedLM(tiny(mixer, dropout=0.0, attention_dropout=0.0))
    ids = batch(b=3, n=20)
    mask = (torch.arange(20)[None, :] < torch.tensor([[20], [14], [9]])).long()  # padded rows
    labels = torch.where((torch.rand(ids.shape) < 0.3) & mask.bool(), ids, torch.full_like(ids, -100))
    labels[2] = -100  # a row with nothing to predict
    exact = model(ids, mask, labels=labels)
    model.max_predictions = int((labels != -100).sum(1).max())  # as many slots as the fullest row needs
    static = model(ids, mask, labels=labels)
    assert static.logits.shape == (3, model.max_predictions, VOCAB) and int(static.num_masked) == exact.num_masked
    torch.testing.assert_close(static.loss, exact.loss)
    torch.testing.assert_close(static.accuracy, exact.accuracy)
    static.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and "segment" not in str(p.shape))
    # One slot too few: each overflowing row keeps its first labelled positions, in order.
    model.max_predictions -= 1
    assert int(model(ids, mask, labels=labels).num_masked) < exact.num_masked
    assert max_predictions_per_seq(128, 0.15) == 52 and max_predictions_per_seq(512, 0.15) == 139

    def loss(ids, mask, labels):
        out = model(ids, attention_mask=mask, labels=labels)
        return out.loss, out.accuracy, out.num_masked

    explained = torch._dynamo.explain(loss)(ids, mask, labels)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    table = sinusoidal_positions(20, 32, torch.device("cpu"), torch.float32)
    assert sinusoidal_positions(20, 32, torch.device("cpu"), torch.float32) is table  # built once per length


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hypermixing_in_half_precision_at_16k_tokens_stays_close_to_fp32(dtype):
    # W1ᵀ·X sums over all N tokens: it is accumulated in fp32, so bf16/fp16 stay finite and close at N = 16,384.
    torch.manual_seed(0)
    module = HyperMixing(tiny("hypermixer", max_seq_len=16384, hypermixer_layer_norm=False))
    x = torch.randn(1, 16384, 32) * 0.5
    want = module(x)
    got = module.to(dtype)(x.to(dtype)).float()
    assert torch.isfinite(got).all()
    relative = ((got - want).norm() / want.norm()).item()
    assert relative < (2e-2 if dtype == torch.bfloat16 else 5e-3), relative
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = module.float()(x).float()
    assert torch.isfinite(autocast).all() and ((autocast - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mixer", ["hypermixer", "transformer"])
def test_masked_lm_step_under_autocast_tracks_fp32(mixer, dtype):
    # fp16 pretraining cannot run on DeepSpeed's CPU accelerator (it refuses it): the model is tested here.
    torch.manual_seed(0)
    model = ForMaskedLM(tiny(mixer, dropout=0.0, attention_dropout=0.0))
    model.max_predictions = 8
    ids = batch(b=4, n=24)
    labels = torch.where(torch.rand(ids.shape) < 0.15, ids, torch.full_like(ids, -100))
    want = model(ids, labels=labels).loss
    with torch.autocast("cpu", dtype=dtype):
        got = model(ids, labels=labels).loss
    got.backward()
    assert torch.isfinite(got) and abs(got.item() - want.item()) < 2e-2, (got.item(), want.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_position_table_first_built_in_inference_mode_still_trains():
    # Fine-tuning evaluates under torch.inference_mode, then trains again on the same cached sinusoidal table.
    model = ForMaskedLM(tiny("hypermixer", max_seq_len=48))
    ids = torch.randint(5, 50, (2, 37))  # a length no other test asks for: the table is built right here
    with torch.inference_mode():
        model(ids)
    labels = ids.clone()
    model(ids, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_every_config_mistake_is_reported_at_once():
    with pytest.raises(ValueError) as caught:
        EncoderConfig(num_layers=0, mixer="lstm", dropout=1.5, hidden_size=30, num_heads=4, intermediate_size=2.5)
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == ["num_layers", "intermediate_size", "mixer", "dropout", "num_heads"]
