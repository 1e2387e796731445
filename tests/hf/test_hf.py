"""matrec.hf: MatrecConfig / MatrecForCausalLM with transformers (save/load, Auto classes,
generate, padding, tokenizers, export-hf)."""
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import matrec  # noqa: E402
import matrec.hf  # noqa: E402
from matrec.hf import MatrecCache, MatrecConfig, MatrecForCausalLM, config_from_model_spec  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

V = 13
# one small model per mixer / recurrent cell: (registry name, build_model arguments)
MODELS = {
    "mru": ("mru", dict(d_model=16, n_layers=1, n_heads=2, state_matrix="cayley")),
    "attn": ("attn", dict(d_model=16, n_layers=1, n_heads=2, pos="xpos")),
    "linear_attn": ("linear_attn", dict(d_model=16, n_layers=1, n_heads=2, chunk_size=4)),
    "txl": ("txl", dict(d_model=16, n_layers=1, n_heads=2, mem_len=64)),
    "mru_rotary": ("mru_rotary", dict(d_model=16, n_layers=1, n_heads=2, chunk_size=4)),
    "hybrid": ("sequence", dict(pattern=["attn", "mlp", "mru", "lstm", "gru"], d_model=16, n_heads=2,
                                mixer_options={"mru": {"state_matrix": "householder"}})),
    "lstm": ("lstm", dict(hidden_size=12, num_layers=2, embed_dim=8)),
    "gru": ("gru", dict(hidden_size=12)),
    "rnn": ("rnn", dict(hidden_size=12)),
    "mornn": ("mornn", dict(hidden_size=12)),
}


def make(key: str, seed: int = 0) -> MatrecForCausalLM:
    name, args = MODELS[key]
    config = config_from_model_spec(name, vocab_size=V, **args)
    torch.manual_seed(seed)
    model = MatrecForCausalLM(config).eval()
    with torch.no_grad():  # the MRU starts at the identity: move it off so the test can see it
        for n, p in model.named_parameters():
            if "in_proj" in n or "rotation" in n:
                p.normal_(0, 0.3)
    return model


def test_import_matrec_does_not_import_transformers():
    code = ("import sys, matrec, matrec.models, matrec.cli; matrec.build_model('mru', vocab_size=5, "
            "output_size=5); matrec.cli.build_parser(); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("key", ["mru", "attn", "txl", "mru_rotary", "hybrid", "lstm", "mornn"])
def test_save_from_pretrained_round_trip_is_bit_exact(key, tmp_path):
    model = make(key)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "matrec" and saved["architectures"] == ["MatrecForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MatrecForCausalLM
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    for (n, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers()):  # rotary tables too
        assert torch.equal(a, b), n
    x = torch.randint(0, V, (2, 7))
    assert torch.equal(model(x).logits, loaded(x).logits)
    if model.config.tie_word_embeddings:
        assert loaded.model.head.weight is loaded.model.encoder.weight


def test_auto_config_and_explicit_fields(tmp_path):
    config = config_from_model_spec("ablation-mru-cayley", vocab_size=V, d_model=32)
    assert config.backbone == "sequence" and config.pattern == ["mru"] + ["mlp"] * 4
    assert config.mixer_options == {"mru": {"state_matrix": "cayley"}} and config.d_model == 32
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, MatrecConfig) and again.to_diff_dict() == config.to_diff_dict()
    rnn = config_from_model_spec("mornn", vocab_size=V, hidden_size=8, init="identity")
    assert (rnn.backbone, rnn.hidden_size, rnn.rnn_options) == ("mornn", 8, {"init": "identity"})


@pytest.mark.parametrize("name", ["sequence", "mru", "mlp", "attn", "ablation-mru-ldu", "shakespeare-attn", "rnn",
                                  "lstm", "gru", "mornn"])
def test_config_from_the_model_spec_builds_the_same_architecture(name):
    """The config is what the model's own factory writes out (models.registry.architecture): the
    rebuilt backbone has the registry's parameters, names and shapes, for plain, preset, explicit
    and recurrent models (hf restates none of the zoo's rules)."""
    import matrec
    from matrec.hf.configuration import recurrent_backbones

    args = {"sequence": dict(pattern=["mru", "mlp", "lstm"], d_model=16, n_heads=2),
            "mru": dict(d_model=16, n_layers=2, n_heads=2, state_matrix="cayley"),
            "rnn": dict(hidden_size=6, num_layers=2), "mornn": dict(hidden_size=6, init="identity")}.get(name, {})
    config = config_from_model_spec(name, vocab_size=V, **args)
    want = matrec.build_model(name, vocab_size=V, output_size=V, **args)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(config.build()) == shapes(want)
    assert set(recurrent_backbones()) >= {"rnn", "lstm", "gru", "mornn"}
    assert config.backbone == (name if name in recurrent_backbones() else "sequence")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown mixer.*'mystery'"):
        MatrecConfig(pattern=["mru", "mystery"], vocab_size=V)
    with pytest.raises(ValueError, match="backbone must be one of"):
        MatrecConfig(backbone="transformer")
    with pytest.raises(ValueError, match="model must be one of"):
        config_from_model_spec("nope", vocab_size=V)
    with pytest.raises(ValueError, match="model 'seasonal_naive' has no written-out architecture"):
        config_from_model_spec("seasonal_naive", vocab_size=V)
    make("mru").save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in data.items() if k != "pattern"}))
    with pytest.raises(ValueError, match=r"missing the field\(s\) \['pattern'\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**data, "pattern": ["mru", "lstmm"]}))
    with pytest.raises(ValueError, match="unknown mixer.*'lstmm'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "matrec", "vocab_size": 5}))
    with pytest.raises(ValueError, match="not a matrec model config.*backbone"):
        MatrecForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 5}))
    with pytest.raises(ValueError, match="not a matrec model: config.json has model_type 'gpt2'"):
        MatrecForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json is missing"):
        MatrecForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("key", list(MODELS))
def test_generate_greedy_equals_matrec_generate(key):
    model = make(key)
    prompt = torch.randint(0, V, (3, 5))
    got = model.generate(prompt, max_new_tokens=8, do_sample=False)
    want = matrec.generate(model.model, prompt, 8, temperature=0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("key", list(MODELS))
def test_beam_search_and_sampling_use_the_cache_correctly(key):
    # the cached path (states reordered by beam search) must pick what re-running the whole
    # sequence without a cache picks
    model = make(key, seed=1)
    prompt = torch.randint(0, V, (2, 4))
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    cached = model.generate(prompt, use_cache=True, **kw)
    assert cached.shape == (4, 10)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kw))
    kw = dict(max_new_tokens=6, do_sample=True, top_k=5, temperature=1.3)
    torch.manual_seed(3)
    sampled = model.generate(prompt, use_cache=True, **kw)
    torch.manual_seed(3)
    assert torch.equal(sampled, model.generate(prompt, use_cache=False, **kw))
    assert sampled.shape == (2, 10) and int(sampled.max()) < V


def test_cache_is_batch_first_and_continues_generation():
    model = make("hybrid")  # attn, mru, lstm, gru layers
    x = torch.randint(0, V, (2, 6))
    out = model(x[:, :4], use_cache=True)
    cache = out.cache
    assert isinstance(cache, MatrecCache) and cache.get_seq_length() == 4
    (rows, state), = cache.groups
    for t in (t for s in state if s is not None for t in (s if isinstance(s, tuple) else (s,))):
        assert t.dim() == 0 or t.shape[0] == 2  # batch first (the LSTM's [layers, B, H] too)
    step = model(x[:, 4:], cache=cache, use_cache=True).logits
    assert torch.allclose(step, model(x).logits[:, 4:], atol=1e-5)


def test_labels_give_the_shifted_next_token_loss_and_gradients():
    model = make("hybrid").train()
    x = torch.randint(0, V, (2, 9))
    labels = x.clone()
    labels[0, :3] = -100  # ignored positions
    out = model(x, labels=labels, use_cache=False)
    want = torch.nn.functional.cross_entropy(model.model(x)[0][:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    assert out.cache is None and torch.allclose(out.loss, want)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="does not return hidden_states"):
        model(x, output_hidden_states=True)


@pytest.mark.parametrize("key", ["hybrid", "attn"])
def test_cache_batch_repeat_and_select_continue_the_right_rows(key):
    model = make(key)
    ids, mask = _left_padded([torch.arange(1, 6), torch.arange(2, 4)], 5)  # attn: two groups
    nxt = torch.tensor([[3], [4], [5], [6]])
    cache = model(ids, attention_mask=mask, use_cache=True).cache
    cache.batch_repeat_interleave(2)  # rows 0, 0, 1, 1
    step = model(nxt, cache=cache, use_cache=True).logits
    for i, r in enumerate([torch.arange(1, 6), torch.arange(1, 6), torch.arange(2, 4), torch.arange(2, 4)]):
        alone = model(torch.cat([r, nxt[i]])[None]).logits[0, -1]
        torch.testing.assert_close(step[i, -1], alone, atol=1e-5, rtol=0)
    cache.batch_select_indices(torch.tensor([2]))  # keep the third row (the second prompt, 3 + 1 tokens)
    step = model(torch.tensor([[7]]), cache=cache, use_cache=True).logits
    alone = model(torch.tensor([[2, 3, 5, 7]])).logits[0, -1]
    torch.testing.assert_close(step[0, -1], alone, atol=1e-5, rtol=0)


def _left_padded(rows, T):
    ids = torch.full((len(rows), T), V)  # pad id V: past the vocabulary, never fed to the model
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return ids, mask


@pytest.mark.parametrize("key", list(MODELS))
def test_left_padding_gives_the_unpadded_logits_and_generations(key):
    model = make(key, seed=2)
    torch.manual_seed(5)
    rows = [torch.randint(0, V, (n,)) for n in (7, 3, 5, 3, 1)]
    ids, mask = _left_padded(rows, 7)
    logits = model(ids, attention_mask=mask).logits
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i, 7 - len(r):], model(r[None]).logits[0], atol=1e-5, rtol=0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=V)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=5, do_sample=False)[0, len(r):]
        assert torch.equal(out[i, 7:], alone), i
    kw = dict(attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=V)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("key", ["mru", "attn", "hybrid", "lstm"])
def test_padding_is_read_from_the_attention_mask_not_from_the_pad_id(key):
    """The pad id is a real token (2) that also starts and fills the prompts: only the attention
    mask says which positions are padding, so each row computes and generates what it does alone."""
    model = make(key, seed=3)
    P = 2
    rows = [torch.tensor([P, 5, P, 7, P]), torch.tensor([P, P, 4]), torch.tensor([P])]
    ids, mask = _left_padded(rows, 5)
    ids[mask == 0] = P
    assert (ids == P).sum() > (mask == 0).sum()   # the pad id occurs at unpadded positions too
    logits = model(ids, attention_mask=mask).logits
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i, 5 - len(r):], model(r[None]).logits[0], atol=1e-5, rtol=0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=P)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long),
                               max_new_tokens=4, do_sample=False, pad_token_id=P)[0, len(r):]
        assert torch.equal(out[i, 5:], alone), i


def test_padded_prompt_groups_merge_for_recurrences_only():
    ids, mask = _left_padded([torch.arange(6), torch.arange(2)], 6)
    # fixed-size states (MRU, RNN): one batch after the prompt; KV caches keep one group per length
    assert len(make("mru")(ids, attention_mask=mask).cache.groups) == 1
    assert len(make("lstm")(ids, attention_mask=mask).cache.groups) == 1
    assert len(make("attn")(ids, attention_mask=mask).cache.groups) == 2


def test_padding_errors():
    model = make("mru")
    ids = torch.randint(0, V, (2, 4))
    with pytest.raises(ValueError, match="left padding"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="row without any token"):
        model(ids, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\]"):
        model(ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=f"id {V} at an unmasked position.*vocabulary of {V} tokens"):
        model(torch.tensor([[1, V]]))
    cache = model(ids, use_cache=True).cache
    with pytest.raises(ValueError, match="only the prompt may be padded"):
        model(ids[:, :1], cache=cache, attention_mask=torch.tensor([[1] * 4 + [0], [1] * 5]))


# --------------------------------------------------------------------------- tokenizers, export


from matrec import cli  # noqa: E402
from matrec.data.tasks import build_task  # noqa: E402
from matrec.hf.tokenization import PAD, bpe_tokenizer, char_tokenizer, check_tokenizer, task_tokenizer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from support import SHAKESPEARE_FILE  # noqa: E402
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE_FILE.exists(),
                                       reason="shared/data/tinyshakespeare.txt not beside the repo")


@needs_shakespeare
def test_char_tokenizer_round_trip_with_auto_tokenizer(tmp_path):
    task = build_task("shakespeare", seq_len=16, path=str(SHAKESPEARE_FILE))
    task_tokenizer(task).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = SHAKESPEARE_FILE.read_text()[:5000]  # newlines, spaces, punctuation, capitals
    ids = tok(text)["input_ids"]
    assert ids == task.encode(text).tolist() and tok.decode(ids) == text
    assert (len(tok), tok.pad_token, tok.pad_token_id, tok.padding_side) == (66, PAD, 65, "left")
    batch = tok(["ab", "First"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1, 1], [1] * 5]


def test_bpe_tokenizer_round_trip_with_auto_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("MATREC_CACHE", str(tmp_path / "cache"))
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "Tom"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 9)) + ".\n" for i in range(2000)]
    (tmp_path / "t.txt").write_text("".join(lines))
    task = build_task("text", path=str(tmp_path / "t.txt"), vocab_size=300, seq_len=8)
    task_tokenizer(task).save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "".join(lines[:50]) + "Tom ran, the cat sat é\n"  # an unseen byte still encodes
    ids = tok(text)["input_ids"]
    assert ids == task.encode(text).tolist() and tok.decode(ids) == task.decode(ids) == text
    assert tok.pad_token_id == task.vocab_size and task.tokenizer.get_vocab_size() == task.vocab_size
    check_tokenizer(tok, task.vocab_size)
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens \(without <pad>\).*vocabulary has 65"):
        check_tokenizer(bpe_tokenizer(task.tokenizer), 65)


def test_char_tokenizer_rejects_bad_vocabularies():
    with pytest.raises(ValueError, match="distinct single characters"):
        char_tokenizer(["a", "bc"])
    with pytest.raises(ValueError, match="distinct single characters"):
        char_tokenizer(["a", "a"])


@needs_shakespeare
def test_export_hf_loads_with_auto_classes_in_a_fresh_process(tmp_path, capsys):
    run, data = tmp_path / "run", tmp_path / "shakespeare.txt"
    shutil.copy(SHAKESPEARE_FILE, data)  # removed before the export: the checkpoint has the vocabulary
    code = cli.main(["train", "--task", "shakespeare", "--task-arg", f"path={data}",
                     "--task-arg", "seq_len=32", "--model", "lstm", "--hidden-size", "64", "--steps", "150",
                     "--batch-size", "16", "--lr", "0.02", "--eval-every", "150", "--eval-batches", "1",
                     "--log-every", "150", "--ckpt-every", "150", "--threads", "1", "--no-progress",
                     "--no-tensorboard", "--no-plot", "--out-dir", str(tmp_path), "--run-name", "run"])
    assert code == 0
    capsys.readouterr()
    prompt = "ROMEO:\nThe "
    assert cli.main(["sample", str(run), "--prompt", prompt, "--tokens", "24", "--temperature", "0"]) == 0
    sampled = capsys.readouterr().out[:-1]
    _, task, trained, _ = cli._load_for_inference(run)
    data.unlink()
    assert cli.main(["export-hf", str(run), str(tmp_path / "hf")]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    assert len(set(sampled[len(prompt):])) > 2  # trained enough to say more than spaces
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = task.encode(SHAKESPEARE_FILE.read_text()[:200])[None]
    assert torch.equal(exported(x).logits, trained(x)[0])
    script = f"""
import torch, matrec.hf
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}).eval()
tok = AutoTokenizer.from_pretrained({str(tmp_path / 'hf')!r})
ids = tok({prompt!r}, return_tensors="pt")["input_ids"]
out = model.generate(ids, max_new_tokens=24, do_sample=False)
print(repr(tok.decode(out[0])))
batch = tok([{prompt!r}, "KING:"], padding=True, return_tensors="pt")
out = model.generate(**batch, max_new_tokens=24, do_sample=False)
print(repr(tok.decode(out[0])))
alone = model.generate(tok("KING:", return_tensors="pt")["input_ids"], max_new_tokens=24, do_sample=False)
print(tok.decode(out[1], skip_special_tokens=True) == tok.decode(alone[0]))
gen = pipeline("text-generation", model=model, tokenizer=tok)
print(repr(gen({prompt!r}, max_new_tokens=24, do_sample=False)[0]["generated_text"]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    lines = result.stdout.strip().splitlines()[-4:]
    assert lines == [repr(sampled), repr(sampled), "True", repr(sampled)], result.stdout + result.stderr
    # a checkpoint from before checkpoints kept the tokenizer: the task is rebuilt, so its data is needed
    state = next(run.glob("checkpoints/step-*")) / "state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "tokenizer"}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["export-hf", str(run), str(tmp_path / "hf2")])
    assert e.value.code == 2 and "shakespeare.txt" in capsys.readouterr().err


def test_export_hf_bad_input_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export-hf", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
    code = cli.main(["train", "--model", "rnn", "--task-arg", "delay=4", "--hidden-size", "8",
                     "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1",
                     "--ckpt-every", "2", "--threads", "1", "--no-progress", "--no-tensorboard",
                     "--no-plot", "--out-dir", str(tmp_path), "--run-name", "copy"])
    assert code == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["export-hf", str(tmp_path / "copy"), str(tmp_path / "out")])
    assert e.value.code == 2 and "export-hf needs a language-model run" in capsys.readouterr().err


@needs_shakespeare
def test_a_workbench_run_fine_tunes_from_a_transformers_directory(tmp_path, capsys):
    config = config_from_model_spec("mru", vocab_size=65, d_model=16, n_layers=1, n_heads=2)
    MatrecForCausalLM(config).save_pretrained(tmp_path / "hf")
    train = dict(task="shakespeare", task_args={"path": str(SHAKESPEARE_FILE), "seq_len": 16}, steps=3,
                 batch_size=4, eval_every=3, eval_batches=1, ckpt_every=3, threads=1, progress=False,
                 tensorboard=False, plot=False)
    run = matrec.hf.workbench_run_from_hf(tmp_path / "hf", tmp_path / "run", **train)
    _, _, start, _ = cli._load_for_inference(run)  # the step-0 checkpoint holds the hf weights
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for k, v in source.model.state_dict().items():
        assert torch.equal(start.state_dict()[k], v), k
    assert cli.main(["train", "--resume", str(run), "--steps", "3"]) == 0
    assert '"step": 3' in capsys.readouterr().out
    assert cli.main(["export-hf", str(run), str(tmp_path / "tuned")]) == 0
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    assert not torch.equal(tuned.model.encoder.weight, source.model.encoder.weight)  # it trained
    with pytest.raises(ValueError, match="comes from"):
        matrec.hf.workbench_run_from_hf(tmp_path / "hf", tmp_path / "x", model="lstm", **train)
    with pytest.raises(ValueError, match=r"task .copy. has \d+ tokens but the model.*has 65"):
        matrec.hf.workbench_run_from_hf(tmp_path / "hf", tmp_path / "y", **{**train, "task": "copy", "task_args": {}})


@needs_shakespeare
def test_import_hf_command_starts_a_run_that_train_resume_fine_tunes(tmp_path, capsys):
    config = config_from_model_spec("mru", vocab_size=65, d_model=16, n_layers=1, n_heads=2)
    MatrecForCausalLM(config).save_pretrained(tmp_path / "hf")
    options = ["--task", "shakespeare", "--task-arg", f"path={SHAKESPEARE_FILE}", "--task-arg", "seq_len=16",
               "--steps", "3", "--batch-size", "4", "--eval-every", "3", "--eval-batches", "1",
               "--ckpt-every", "3", "--threads", "1", "--no-progress", "--no-tensorboard", "--no-plot"]
    assert cli.main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "run"), *options]) == 0
    out = capsys.readouterr().out
    # --steps was given: the run has its length, so no "--steps N" to fill in
    assert out.rstrip().endswith(f"matrec train --resume {tmp_path / 'run'}") and "--steps N" not in out
    _, _, start, _ = cli._load_for_inference(tmp_path / "run")
    source = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for k, v in source.model.state_dict().items():
        assert torch.equal(start.state_dict()[k], v), k
    assert cli.main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert '"step": 3' in capsys.readouterr().out
    _, _, tuned, _ = cli._load_for_inference(tmp_path / "run")
    assert not torch.equal(tuned.encoder.weight, source.model.encoder.weight)   # it trained


def test_import_hf_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    config = config_from_model_spec("mru", vocab_size=65, d_model=16, n_layers=1, n_heads=2)
    MatrecForCausalLM(config).save_pretrained(tmp_path / "hf")
    capsys.readouterr()   # transformers' own progress output
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "r1")], "has no config.json: not a transformers directory"),
        ([str(tmp_path / "gpt2"), str(tmp_path / "r2")], "gpt2"),
        ([str(tmp_path / "hf"), str(tmp_path / "r3"), "--model", "lstm"], "come from HF_DIR's config.json"),
        ([str(tmp_path / "hf"), str(tmp_path / "r4"), "--task", "copy"], "has 10 tokens but the model"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(["import-hf", *argv, "--threads", "1", "--no-progress", "--no-tensorboard"])
        err = capsys.readouterr().err
        last = err.splitlines()[-1]   # after any progress bar transformers draws
        assert e.value.code == 2 and last.startswith("matrec import-hf: error: ") and message in last, err
        assert "Traceback" not in err
    assert not (tmp_path / "r4").exists()   # a refused import leaves nothing behind


def test_export_hf_without_transformers_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['transformers'] = None  # as if it were not installed\n"
            "from matrec import cli\n"
            f"cli.main(['export-hf', {str(tmp_path)!r}, {str(tmp_path / 'out')!r}])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2 and "pip install 'matrec[hf]'" in result.stderr, result.stderr


# what the export extra's libraries print on their own (matrec.quiet drops exactly these)
KNOWN_NOISE = ("Failed to load", "is an Enum subclass", "LeafSpec", "torchvision is not installed",
               "Writing model shards", "will not be used, since it shares")


@needs_shakespeare
@pytest.mark.slow
def test_export_hf_directory_loads_with_trust_remote_code_and_the_commands_are_quiet(tmp_path, capsys):
    """export-hf writes auto_map + modeling_matrec.py: a fresh process that never imports matrec.hf
    loads it with trust_remote_code=True (and, without, gets transformers' unknown-type error). The
    commands, run as a user runs them, print none of the known third-party noise."""
    import os

    from support import ROOT

    run = tmp_path / "run"
    assert cli.main(["train", "--task", "shakespeare", "--task-arg", f"path={SHAKESPEARE_FILE}",
                     "--task-arg", "seq_len=16", "--model", "mornn", "--hidden-size", "16", "--steps", "2",
                     "--batch-size", "4", "--eval-every", "2", "--eval-batches", "1", "--log-every", "2",
                     "--ckpt-every", "2", "--threads", "1", "--no-progress", "--no-tensorboard", "--no-plot",
                     "--out-dir", str(tmp_path), "--run-name", "run"]) == 0
    # a prompt typed with "\n" inside plain quotes (two characters): the error names them
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", str(run), "--prompt", "ROMEO:\\nThe ", "--tokens", "2"])
    assert e.value.code == 2 and "'\\\\' not in it" in capsys.readouterr().err
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    r = subprocess.run([sys.executable, "-m", "matrec.cli", "export-hf", str(run), str(tmp_path / "hf")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert not [n for n in KNOWN_NOISE if n in r.stdout + r.stderr], r.stderr
    assert "trust_remote_code=True" in r.stdout
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_matrec.MatrecForCausalLM"
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=False)
    print("loaded without remote code")
except Exception as e:
    print("refused:", type(e).__name__)
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True).eval()
print(type(model).__module__, type(model).__name__)
torch.save(model(torch.arange(10)[None]).logits, {str(tmp_path / 'logits.pt')!r})
"""
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("refused:") and lines[-1] == "matrec.hf.modeling MatrecForCausalLM", r.stdout
    _, _, trained, _ = cli._load_for_inference(run)
    with torch.no_grad():
        # another process (its own thread count): equal to float32 rounding
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt").detach(), trained(torch.arange(10)[None])[0],
                                   atol=1e-5, rtol=1e-5)
    # import-hf and export, as commands: nothing but their own output
    r = subprocess.run([sys.executable, "-m", "matrec.cli", "import-hf", str(tmp_path / "hf"), str(tmp_path / "back"),
                        "--task", "shakespeare", "--task-arg", f"path={SHAKESPEARE_FILE}", "--task-arg", "seq_len=16",
                        "--threads", "1", "--no-progress", "--no-tensorboard", "--no-plot"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "--steps N" in r.stdout, r.stderr   # no --steps given: say how to set it
    assert not [n for n in KNOWN_NOISE if n in r.stdout + r.stderr] and "Loading weights" not in r.stderr, r.stderr
    if importlib.util.find_spec("onnxscript") is not None:
        r = subprocess.run([sys.executable, "-m", "matrec.cli", "export", str(run), "--format", "onnx"],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert not [n for n in KNOWN_NOISE if n in r.stdout + r.stderr], r.stderr
        assert json.loads(r.stdout)["tokenizer"] == str(run / "tokenizer.json")
