"""Tokenizer merges: `tokenizer_source` (base, union, a model), `tokenizer:` (tokens, force,
pad_to_multiple_of) and `chat_template`, against mergekit-yaml 0.1.5.

1. Parity through the CLI: Llama-shaped checkpoints whose vocabularies differ (tokens missing,
   extra, reordered, added special tokens, a padded embedding), tied and untied embeddings,
   linear / ties / task_arithmetic / slerp: same tensor names, shapes and dtypes, values within
   1e-5 relative, the embedding rows compared token by token (mergekit numbers a union's new
   tokens in hash order, which varies per run); same vocabulary, added tokens and flags, special
   tokens, config vocab_size and chat template (the built-in ones compared by rendering them).
2. Blocks of rows: a merge streamed a few rows at a time equals the one-block merge, bit for bit.
3. Bad input: one line, exit 2, no output.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import llama_factory as lf
from mergekit_runner import run_mergekit_driver
from pymerge import cli

mergekit = pytest.importorskip("mergekit", reason="mergekit 0.1.5 is not installed")

TOL = 1e-5
SPECIAL = ["<unk>", "<s>", "</s>"]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def write_model(folder, words, *, seed=0, perturb_seed=None, tie=False, added=(), rows=None, template=None,
                layers=2):
    """A tiny Llama whose WordLevel tokenizer has `words` (the first three special), then `added`
    special tokens; `rows` embedding rows (default: one per token)."""
    n = len(words) + len(added)
    dims = lf.LlamaDims(hidden=16, layers=layers, intermediate=24, heads=2, kv_heads=1, vocab=rows or n,
                        tie_embeddings=tie)
    f = lf.make_llama(folder, dims=dims, seed=seed, perturb_seed=perturb_seed, perturb=0.3)
    vocab = {w: i for i, w in enumerate(words)}
    entries = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, c in enumerate(words[:3])]
    entries += [{"id": len(words) + j, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for j, c in enumerate(added)]
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": entries, "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (f / "tokenizer.json").write_text(json.dumps(tok))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 256}
    if template:
        config["chat_template"] = template
    (f / "tokenizer_config.json").write_text(json.dumps(config))
    return f


W = [f"w{i}" for i in range(20)]
X = [f"x{i}" for i in range(12)]
C_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for tie in (False, True):
        t = "t" if tie else ""
        out["a" + t] = write_model(root / f"a{t}", SPECIAL + W + ["<pad>"], tie=tie)
        out["b" + t] = write_model(root / f"b{t}", SPECIAL + W[:10] + X, perturb_seed=1, tie=tie,
                                   added=["<|im_start|>"], rows=30)  # padded embedding (26 tokens)
        out["c" + t] = write_model(root / f"c{t}", SPECIAL + X[:5] + W[:15], perturb_seed=2, tie=tie,
                                   added=["<pad>"], template=C_TEMPLATE)
        out["d" + t] = write_model(root / f"d{t}", SPECIAL + W + ["<pad>"], perturb_seed=3, tie=tie)
    return root, {k: str(v) for k, v in out.items()}


F32 = {"dtype": "float32"}


def configs(m):
    a, b, c, d = m["a"], m["b"], m["c"], m["d"]
    at, bt, ct = m["at"], m["bt"], m["ct"]
    return {
        "linear_union": {"merge_method": "linear", "base_model": a, "models": [
            {"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.3}},
            {"model": c, "parameters": {"weight": 0.2}}], "tokenizer_source": "union", **F32},
        "ties_tokens": {"merge_method": "ties", "base_model": a, "models": [
            {"model": b, "parameters": {"weight": 0.6, "density": 0.7}},
            {"model": c, "parameters": {"weight": 0.4, "density": 0.5}}],
            "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
                "<|im_start|>": {"source": b},
                "x0": {"source": {"kind": "model_token", "model": c, "token": "w3"}, "force": True},
                "w1": {"source": {"kind": "zero"}},
                "w15": {"source": {"kind": "model_token", "model": b, "token_id": 4}},
                "<new>": {"source": {"kind": "zero"}}}},
            "chat_template": "chatml", **F32},
        "task_arithmetic_base_tied": {"merge_method": "task_arithmetic", "base_model": at, "models": [
            {"model": bt, "parameters": {"weight": 0.7}}, {"model": ct, "parameters": {"weight": [0.2, 0.9]}}],
            "tokenizer_source": "base", "chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
            **F32},
        "slerp_model_tied": {"merge_method": "slerp", "base_model": at, "models": [{"model": ct}],
                             "parameters": {"t": 0.3}, "tokenizer_source": ct, "chat_template": "auto", **F32},
        "linear_union_bf16": {"merge_method": "linear", "models": [
            {"model": b, "parameters": {"weight": 1.0}}, {"model": c, "parameters": {"weight": 2.0}}],
            "base_model": c, "tokenizer": {"pad_to_multiple_of": 12}, "dtype": "bfloat16"},
        # a vocabulary already a multiple (of 1: every one) keeps its size (a base_model: without one, mergekit
        # takes the tokenizer's base from a set, in another order each run)
        "union_pad_already_a_multiple": {"merge_method": "linear", "base_model": a, "models": [
            {"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}],
            "tokenizer": {"source": "union", "pad_to_multiple_of": 1}, **F32},
        "chat_template_only": {"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": 1.0}}, {"model": d, "parameters": {"weight": 1.0}}],
            "chat_template": "llama3", **F32},
    }


NAMES = list(configs({k: k for k in ("a", "b", "c", "d", "at", "bt", "ct", "dt")}))


@pytest.fixture(scope="module")
def parity(models):
    root, m = models
    return run_mergekit(root, configs(m))


def run_mergekit(root, configs) -> Path:
    """Writes each config as root/<name>.yml and runs mergekit-yaml on all of them in one process
    (one import of mergekit) into root/mk/<name>; returns root."""
    jobs = []
    for name, c in configs.items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump(c, sort_keys=False))
        jobs.append((str(path), str(root / "mk" / name)))
    driver = ("import json, sys\nfrom mergekit.scripts.run_yaml import main\n"
              "for cfg, out in json.loads(sys.argv[1]):\n"
              "    main([cfg, out, '--quiet', '--no-cuda'], standalone_mode=False)\n")
    proc = run_mergekit_driver(driver, [json.dumps(jobs)], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def run_cli(argv, capsys):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def close(a, b) -> bool:
    """float32: within 1e-5 relative. 16-bit: one rounding step apart (the tools round float32 values
    that differ in their last bits: mergekit's linear computes in bfloat16)."""
    if b.dtype == torch.float32 or not b.numel():
        return rel(a, b) <= TOL
    a, b = a.double(), b.double()
    return bool(((a - b).abs() <= torch.finfo(torch.bfloat16).eps * b.abs() + 1e-7 * b.abs().max()).all())


def vocab_of(folder):
    t = json.loads((folder / "tokenizer.json").read_text())
    v = dict(t["model"]["vocab"])
    v.update({e["content"]: e["id"] for e in t["added_tokens"]})
    return v, {e["content"]: {k: e[k] for k in e if k != "id"} for e in t["added_tokens"]}


def render(template, messages, gen):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    return env.from_string(template).render(messages=messages, add_generation_prompt=gen, bos_token="<s>",
                                            eos_token="</s>")


CONVERSATIONS = [[{"role": "user", "content": " hi "}],
                 [{"role": "system", "content": "be brief "}, {"role": "user", "content": "q1"},
                  {"role": "assistant", "content": " a1"}, {"role": "user", "content": "q2\n"}]]


@pytest.mark.parametrize("name", NAMES)
def test_matches_mergekit_yaml(parity, name, tmp_path, capsys):
    out, theirs_dir = tmp_path / "out", parity / "mk" / name
    rc, err = run_cli(["merge", parity / f"{name}.yml", out, "--quiet"], capsys)
    assert rc == 0, err
    assert_same_merge(out, theirs_dir, yaml.safe_load((parity / f"{name}.yml").read_text()), name)


def assert_same_merge(out, theirs_dir, cfg, name):
    """Our output folder against mergekit's for one config: tensors (vocabulary rows per token),
    vocabulary and added tokens, config vocab_size, tokenizer config, chat template, files."""
    ours, theirs = lf.load_folder(out), lf.load_folder(theirs_dir)
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    (vo, added_o), (vt, added_t) = vocab_of(out), vocab_of(theirs_dir)
    assert set(vo) == set(vt) and added_o.keys() == added_t.keys()
    assert added_o == added_t  # flags (special, normalized, ...) of every added token
    union = (cfg.get("tokenizer") or {}).get("source", "union") == "union" if "tokenizer" in cfg \
        else cfg.get("tokenizer_source") == "union"
    if not union:
        assert vo == vt  # same ids too
    tokens = sorted(vt, key=vt.get)
    for k, b in theirs.items():
        a = ours[k]
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, b.dtype, a.shape, b.shape)
        if k in VOCAB_TENSORS:  # row by row, per token; padding rows (the mean) as they are
            n = len(tokens)
            assert close(a[[vo[t] for t in tokens]], b[[vt[t] for t in tokens]]), (name, k)
            assert close(a[n:], b[n:]), (name, k, "padding")
        else:
            assert close(a, b), (name, k, rel(a, b))
    cfg_o, cfg_t = (json.loads((d / "config.json").read_text()) for d in (out, theirs_dir))
    assert cfg_o["vocab_size"] == cfg_t["vocab_size"]
    tc_o, tc_t = (json.loads((d / "tokenizer_config.json").read_text()) for d in (out, theirs_dir))
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "model_max_length", "chat_template"):
        assert tc_o.get(key) == tc_t.get(key), key
    tpl_o, tpl_t = ((d / "chat_template.jinja") for d in (out, theirs_dir))
    assert tpl_o.exists() == tpl_t.exists()
    if tpl_t.exists():
        if cfg.get("chat_template") in ("chatml", "llama3"):  # built-ins: pymerge's own text, same conversations
            for conv in CONVERSATIONS:
                for gen in (False, True):
                    assert render(tpl_o.read_text(), conv, gen) == render(tpl_t.read_text(), conv, gen)
        else:
            assert tpl_o.read_text() == tpl_t.read_text()
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model",
                       "special_tokens_map.json"}
    extra = {"special_tokens_map.json", "generation_config.json"}  # pymerge keeps the source's
    names = lambda d: {p.name for p in d.iterdir()} & tokenizer_files  # noqa: E731
    assert names(theirs_dir) <= names(out) <= names(theirs_dir) | extra


def test_union_vocabulary_and_rows(parity, tmp_path, capsys):
    """Union: the base's ids unchanged, the others' tokens appended (plain ones, then added ones);
    a token only one model has takes that model's row; one the base lacks but two have, their mean."""
    out = tmp_path / "o"
    assert run_cli(["merge", parity / "linear_union.yml", out, "--quiet"], capsys)[0] == 0
    cfg = yaml.safe_load((parity / "linear_union.yml").read_text())
    a, b, c = (m["model"] for m in cfg["models"])
    v, added = vocab_of(out)
    va, vb, vc = (vocab_of(Path(x))[0] for x in (a, b, c))
    assert all(v[t] == i for t, i in va.items())
    assert [t for t in sorted(v, key=v.get) if t not in va] == X + ["<|im_start|>"]
    assert added["x0"]["normalized"] and not added["x0"]["special"] and added["<|im_start|>"]["special"]
    got = lf.load_folder(out)["model.embed_tokens.weight"].double()
    e = {k: lf.load_folder(x)["model.embed_tokens.weight"].double() for k, x in (("a", a), ("b", b), ("c", c))}
    # x7: only b has it, so every model's row is b's, and the merge is b's row
    assert rel(got[v["x7"]], e["b"][vb["x7"]]) <= 1e-6
    # x2: b and c have it (the base does not): each lacking model takes their mean
    mean = (e["b"][vb["x2"]] + e["c"][vc["x2"]]) / 2
    want = 0.5 * mean + 0.3 * e["b"][vb["x2"]] + 0.2 * e["c"][vc["x2"]]
    assert rel(got[v["x2"]], want) <= 1e-6
    # w12: a and c have it, b does not: b takes the base's row
    want = 0.5 * e["a"][va["w12"]] + 0.3 * e["a"][va["w12"]] + 0.2 * e["c"][vc["w12"]]
    assert rel(got[v["w12"]], want) <= 1e-6


def test_blocks_of_rows_give_the_same_bits(parity, tmp_path, capsys, monkeypatch):
    from pymerge.tokenizer import rows
    for name in ("ties_tokens", "linear_union_bf16"):
        whole = tmp_path / f"{name}-whole"
        assert run_cli(["merge", parity / f"{name}.yml", whole, "--quiet"], capsys)[0] == 0
        for step in (1, 3, 7):
            monkeypatch.setattr(rows, "rows_per_block", lambda *a, step=step: step)
            out = tmp_path / f"{name}-{step}"
            assert run_cli(["merge", parity / f"{name}.yml", out, "--quiet"], capsys)[0] == 0
            a, b = lf.load_folder(out), lf.load_folder(whole)
            assert all(torch.equal(a[k], b[k]) for k in b), (name, step)
        monkeypatch.undo()


def test_padding_rows_do_not_depend_on_the_block_size(tmp_path, capsys, monkeypatch):
    """The padding rows (each model's mean row) were block sums added up: rows 1, 2**53, 1, -2**53 gave
    0.25 in blocks of 2 rows or more and 0.0 in blocks of one (bug hunt). Now a running sum in row order."""
    from safetensors.torch import load_file, save_file
    from pymerge.tokenizer import rows
    models = []
    for k in range(2):
        f = write_model(tmp_path / f"m{k}", SPECIAL + W[:3], seed=k)
        st = load_file(f / "model.safetensors")
        emb = st["model.embed_tokens.weight"]
        emb[:4] = torch.tensor([1.0, 2.0**53, 1.0, -2.0**53])[:, None]
        save_file(st, f / "model.safetensors")
        models.append(str(f))
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": m, "parameters": {"weight": 0.5}} for m in models],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 16}, "dtype": "float32"}))
    written = []
    for step in (1, 2, 5, 1000):
        monkeypatch.setattr(rows, "rows_per_block", lambda *a, step=step: step)
        out = tmp_path / f"out{step}"
        assert run_cli(["merge", cfg, out, "--quiet"], capsys)[0] == 0
        written.append(lf.load_folder(out)["model.embed_tokens.weight"])
    assert written[0].shape[0] == 16 and all(torch.equal(written[0], w) for w in written[1:])


@pytest.mark.parametrize("source", ["model", "base"])
def test_an_added_entry_for_a_vocabulary_token_keeps_the_vocabulary_id(tmp_path, capsys, source):
    """An added_tokens entry whose content the model's vocabulary has under another id: tokenizers (so
    transformers and mergekit) maps the token to the vocabulary's id. pymerge took the entry's: the wrong
    embedding row, or "ids have gaps" with that model's tokenizer (a fuzz against mergekit)."""
    a = write_model(tmp_path / "a", SPECIAL + W[:8], seed=0)
    b = write_model(tmp_path / "b", SPECIAL + W[:8], seed=1, perturb_seed=2, rows=len(SPECIAL) + 9)
    tok = json.loads((b / "tokenizer.json").read_text())
    vocab_id = tok["model"]["vocab"]["w5"]
    tok["added_tokens"].append({"id": len(SPECIAL) + 8, "content": "w5", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": True, "special": False})
    (b / "tokenizer.json").write_text(json.dumps(tok))
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "linear", "base_model": str(a if source == "model" else b), "dtype": "float32",
        "tokenizer_source": str(a) if source == "model" else "base",
        "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
    assert rc == 0, err
    out = lf.load_folder(tmp_path / "out")["model.embed_tokens.weight"].double()
    ea, eb = (lf.load_folder(m)["model.embed_tokens.weight"].double() for m in (a, b))
    out_id = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"]["w5"]
    assert torch.allclose(out[out_id], (ea[vocab_id] + eb[vocab_id]) / 2, atol=1e-6)


ADDED_ORDERS = [  # (id, content) as listed -> the ids tokenizers gives (six model tokens a .. f)
    ([(7, "<x>"), (6, "<y>")], {"<x>": 6, "<y>": 7}),          # out of order
    ([(6, "<x>"), (8, "<y>")], {"<x>": 6, "<y>": 7}),          # a gap
    ([(6, "<x>"), (7, "<x>")], {"<x>": 6}),                    # a repeat
    ([(1, "<x>")], {"<x>": 6}),                                # an id inside the model's vocabulary
    ([(9, "c"), (3, "<x>"), (2, "<y>")], {"c": 2, "<x>": 6, "<y>": 7}),  # a model token keeps its id
    ([(6, ""), (7, "<x>")], {"<x>": 6}),                       # an empty content is not a token
]


@pytest.mark.parametrize("listed,expected", ADDED_ORDERS)
def test_added_tokens_get_the_ids_tokenizers_gives_them(tmp_path, listed, expected):
    """tokenizers numbers added tokens in list order, whatever their "id" fields say; pymerge took the
    fields as written, so a hand-edited list out of order merged embedding rows under the wrong tokens
    (a hunt against mergekit: '<s>' and '<|im_end|>' swapped, exit 0)."""
    from pymerge.tokenizer.files import read_tokenizer
    entries = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": j % 2 == 0} for j, (i, c) in enumerate(listed)]
    doc = {"version": "1.0", "added_tokens": entries, "normalizer": None, "pre_tokenizer": None,
           "post_processor": None, "decoder": None, "truncation": None, "padding": None,
           "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate("abcdef")}, "unk_token": "a"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    tok = read_tokenizer(tmp_path)
    assert {c: tok.vocab[c] for c in expected} == expected and "" not in tok.vocab
    assert {e["content"]: e["id"] for e in tok.added} == expected  # and written so
    try:
        import tokenizers
    except ImportError:
        return
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab(with_added_tokens=True)
    assert {c: theirs[c] for c in expected} == expected


@pytest.mark.parametrize("model, listed, expected", [
    # a vocabulary with gaps: new ids count from its size (2), past new ids only (not '<pad>''s 7)
    ({"type": "WordLevel", "vocab": {"a": 0, "<pad>": 7}, "unk_token": "a"},
     [(7, "<pad>"), (2, "<x>"), (3, "<y>")], {"<pad>": 7, "<x>": 2, "<y>": 3}),
    # a Unigram listing a piece twice: its size is the list's length (5), not the distinct pieces
    ({"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0], ["b", -2.0], ["a", -3.0], ["c", -4.0]]},
     [(5, "<s>"), (6, "</s>")], {"<s>": 5, "</s>": 6}),
])
def test_added_token_ids_past_an_uneven_vocabulary(tmp_path, model, listed, expected):
    """Two cases where the first numbering differed from tokenizers 0.23 (a review's fuzz)."""
    from pymerge.tokenizer.files import read_tokenizer
    entries = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, c in listed]
    doc = {"version": "1.0", "added_tokens": entries, "normalizer": None, "pre_tokenizer": None,
           "post_processor": None, "decoder": None, "truncation": None, "padding": None, "model": model}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    assert {c: read_tokenizer(tmp_path).vocab[c] for c in expected} == expected
    try:
        import tokenizers
    except ImportError:
        return
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab(with_added_tokens=True)
    assert {c: theirs[c] for c in expected} == expected


def test_rows_of_added_tokens_listed_out_of_order_follow_the_token(tmp_path, capsys):
    """End to end: the output's source lists its added tokens out of id order; each merged row is the mean
    of the rows the tokenizers' ids name."""
    a = write_model(tmp_path / "a", SPECIAL + W[:8], seed=0, added=["<p>", "<q>"])
    b = write_model(tmp_path / "b", SPECIAL + W[:8], seed=1, perturb_seed=2, added=["<p>", "<q>"])
    for m in (a, b):
        tok = json.loads((m / "tokenizer.json").read_text())
        tok["added_tokens"][-2:] = tok["added_tokens"][-2:][::-1]  # "<q>" (id 12) listed before "<p>" (11)
        (m / "tokenizer.json").write_text(json.dumps(tok))
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
        "models": [{"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}))
    rc, err = run_cli(["merge", cfg, tmp_path / "out", "--quiet"], capsys)
    assert rc == 0, err
    out = lf.load_folder(tmp_path / "out")["model.embed_tokens.weight"].double()
    ea, eb = (lf.load_folder(m)["model.embed_tokens.weight"].double() for m in (a, b))
    ids = {e["content"]: e["id"] for e in json.loads((tmp_path / "out" / "tokenizer.json").read_text())["added_tokens"]}
    n = len(SPECIAL) + 8
    for token, theirs in (("<q>", n), ("<p>", n + 1)):  # tokenizers: list order
        assert torch.allclose(out[ids[token]], (ea[theirs] + eb[theirs]) / 2, atol=1e-6), token


def test_vocab_size_is_written_where_the_config_keeps_it(models, tmp_path, capsys):
    """A multimodal config (Mistral3, Gemma3, Qwen-VL) keeps vocab_size in text_config: the new size goes
    there, as mergekit's vocab_size_config_key (plain and slices merges; the slices one also rewrites
    text_config's layer count). A new top-level vocab_size beside the stale text_config one made
    transformers refuse the output."""
    _, m = models
    vlm = {}
    for k in ("a", "b"):
        f = tmp_path / k
        f.mkdir()
        for p in Path(m[k]).iterdir():
            (f / p.name).write_bytes(p.read_bytes())
        cfg = json.loads((f / "config.json").read_text())
        text = {"vocab_size": cfg.pop("vocab_size"), "num_hidden_layers": cfg.pop("num_hidden_layers")}
        (f / "config.json").write_text(json.dumps({**cfg, "text_config": text}))
        vlm[k] = str(f)
    franken = {"merge_method": "passthrough", "base_model": vlm["a"], "tokenizer_source": "union",
               "slices": [{"sources": [{"model": vlm["a"], "layer_range": [0, 2]}]},
                          {"sources": [{"model": vlm["b"], "layer_range": [1, 2]}]}]}
    for name, cfg, layers in (("plain", _union(vlm["a"], vlm["b"]), 2), ("slices", franken, 3)):
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        rc, err = run_cli(["merge", path, tmp_path / name, "--quiet"], capsys)
        assert rc == 0, err
        out = json.loads((tmp_path / name / "config.json").read_text())
        rows = lf.load_folder(tmp_path / name)["model.embed_tokens.weight"].shape[0]
        assert rows == len(vocab_of(tmp_path / name)[0]) == 37 and "vocab_size" not in out, (name, rows, out)
        assert out["text_config"] == {"vocab_size": rows, "num_hidden_layers": layers}, name


def test_vocab_size_goes_to_text_config_where_the_donor_left_it_to_its_default():
    """Gemma3 and Llama4 configs leave text_config.vocab_size to its default: a top-level key alone was
    ignored by transformers (the output kept the old size), while mergekit sets text_config's (a review)."""
    from pymerge.tokenizer.plan import vocab_size_override
    for cfg, want in (({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}},
                       ({"model_type": "gemma3_text", "vocab_size": 37}, None)),
                      ({"vocab_size": 9, "text_config": {}}, ({"vocab_size": 37}, 37)),
                      ({"model_type": "llama", "vocab_size": 9}, (None, 37))):
        overrides = {}
        vocab_size_override(cfg, overrides, 37)
        assert (overrides.get("text_config"), overrides.get("vocab_size")) == want, cfg


def test_chat_template_auto_reads_only_the_default_template(models, tmp_path, capsys):
    """`chat_template: auto` counts and writes each model's default template only; a named one whose name or
    text could not be written out (another model's, never used) failed the merge (a review)."""
    _, m = models
    c = write_model(tmp_path / "c", SPECIAL + W + ["<pad>"], perturb_seed=2)
    config = json.loads((c / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "{{ messages[0]['content'] }}"},
                               {"name": "a/b", "template": "\ud800"}]
    (c / "tokenizer_config.json").write_text(json.dumps(config))
    (c / "additional_chat_templates").mkdir()  # a named one as a file, not UTF-8: not read either
    (c / "additional_chat_templates" / "rag.jinja").write_bytes(b"\xff\xfe")
    path = tmp_path / "auto.yml"
    path.write_text(yaml.safe_dump({**_union(str(c), m["a"]), "chat_template": "auto", "tokenizer_source": None}))
    rc, err = run_cli(["merge", path, tmp_path / "out", "--quiet"], capsys)
    assert rc == 0, err
    shutil.rmtree(c / "additional_chat_templates")
    config["chat_template"] = [{"name": "default", "template": "x"}, {"name": "tool\ud800", "template": "y"}]
    (c / "tokenizer_config.json").write_text(json.dumps(config))  # written as NAME.jinja by a tokenizer merge
    (tmp_path / "named").mkdir()
    _bad(tmp_path / "named", capsys, {**_union(str(c), m["a"]), "tokenizer_source": "base"},
         "c/tokenizer_config.json", "lone surrogate")


@pytest.mark.parametrize("layout", ["list", "files"])
def test_named_chat_templates_are_kept(models, tmp_path, capsys, layout):
    """The source's named templates (tool_use, rag, ...: a list in tokenizer_config.json, as transformers 4
    saved them, or additional_chat_templates/NAME.jinja, as transformers 5 does) are written as
    save_pretrained lays them out, as mergekit keeps them. Only the default one was written, so
    apply_chat_template(tools=...) silently rendered it. A `chat_template:` replaces them all, as in mergekit."""
    _, m = models
    a = tmp_path / "a"
    a.mkdir()
    for p in Path(m["a"]).iterdir():
        (a / p.name).write_bytes(p.read_bytes())
    named = {"default": "{% for m in messages %}D {{ m['content'] }}{% endfor %}",
             "tool_use": "{% for m in messages %}T {{ m['content'] }}{% endfor %}"}
    config = json.loads((a / "tokenizer_config.json").read_text())
    if layout == "list":
        config["chat_template"] = [{"name": k, "template": v} for k, v in named.items()]
    else:
        (a / "chat_template.jinja").write_text(named["default"])
        (a / "additional_chat_templates").mkdir()
        (a / "additional_chat_templates" / "tool_use.jinja").write_text(named["tool_use"])
    (a / "tokenizer_config.json").write_text(json.dumps(config))
    for name, more, want in (("kept", {}, named), ("replaced", {"chat_template": "chatml"}, None)):
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(_union(str(a), m["b"], **more), sort_keys=False))
        out = tmp_path / name
        rc, err = run_cli(["merge", path, out, "--quiet"], capsys)
        assert rc == 0, err
        assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
        extra = sorted(p.name for p in (out / "additional_chat_templates").glob("*"))
        assert extra == (["tool_use.jinja"] if want else []), extra
        if want:
            assert (out / "chat_template.jinja").read_text() == named["default"]
            assert (out / "additional_chat_templates" / "tool_use.jinja").read_text() == named["tool_use"]
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "kept").chat_template == named


@pytest.mark.parametrize("layout", ["map", "unigram"])
def test_a_model_without_type_is_read_as_tokenizers_infers_it(models, tmp_path, capsys, layout):
    """An older tokenizer.json whose model has no "type": the tokenizers library (so transformers and mergekit)
    infers it (a listed vocab is Unigram; a mapping BPE, WordPiece or WordLevel, which all map tokens to
    ids). It was refused. The merge equals the one with the type given."""
    _, m = models
    outs = []
    for typed in (True, False):
        b = write_model(tmp_path / f"b{typed}", SPECIAL + W[:10] + X, perturb_seed=1)
        tok = json.loads((b / "tokenizer.json").read_text())
        if layout == "unigram":
            pieces = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
            tok["model"] = {"type": "Unigram", "unk_id": 0, "vocab": [[p, -float(i)] for i, p in enumerate(pieces)]}
        if not typed:
            del tok["model"]["type"]
        (b / "tokenizer.json").write_text(json.dumps(tok))
        path = tmp_path / f"{typed}.yml"
        path.write_text(yaml.safe_dump(_union(m["a"], str(b)), sort_keys=False))
        rc, err = run_cli(["merge", path, tmp_path / f"out{typed}", "--quiet"], capsys)
        assert rc == 0, err
        outs.append(lf.load_folder(tmp_path / f"out{typed}"))
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    tokenizers = pytest.importorskip("tokenizers")
    assert tokenizers.Tokenizer.from_file(str(tmp_path / "outFalse" / "tokenizer.json")).get_vocab_size() == 36


# ---- bad input -------------------------------------------------------------------------------
def _bad(tmp_path, capsys, cfg, *words):
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "out"
    rc, err = run_cli(["merge", path, out, "--quiet"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, (rc, err)
    for w in words:
        assert w in err, (w, err)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _union(a, b, **more):
    return {"merge_method": "linear", "base_model": a, "models": [
        {"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}],
        "tokenizer_source": "union", **more}


def test_missing_or_corrupt_tokenizer(models, tmp_path, capsys):
    _, m = models
    broken = write_model(tmp_path / "broken", SPECIAL + W, perturb_seed=5)
    (broken / "tokenizer.json").unlink()
    _bad(tmp_path, capsys, _union(m["a"], str(broken)), "broken/tokenizer.json", "not found")
    (broken / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": {"a": 0}')
    _bad(tmp_path, capsys, _union(m["a"], str(broken)), "broken/tokenizer.json", "JSON")
    (broken / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": {"a": -3}}}')
    _bad(tmp_path, capsys, _union(m["a"], str(broken)), "broken/tokenizer.json", "ids")
    (broken / "tokenizer.json").write_text('{"model": {"type": "Mystery", "vocab": {}}}')
    _bad(tmp_path, capsys, _union(m["a"], str(broken)), "broken/tokenizer.json", "Mystery")
    (broken / "tokenizer.json").write_text('{"model": {"type": "BPE", "merges": []}}')  # said BPE is unsupported
    _bad(tmp_path, capsys, _union(m["a"], str(broken)), "broken/tokenizer.json", "model.vocab is missing")
    # an added token without its five flags: the union's tokenizer.json, exit 0, was one tokenizers cannot load
    # (missing field 'single_word'; an audit)
    for flag in ("single_word", "lstrip", "rstrip", "normalized", "special"):
        tok = json.loads((m_a := Path(m["a"]) / "tokenizer.json").read_text())
        tok["added_tokens"] = [{"id": 3, "content": "zz"} | {f: False for f in ("single_word", "lstrip", "rstrip",
                                                                               "normalized", "special") if f != flag}]
        tok["model"]["vocab"] = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"])}
        (broken / "tokenizer.json").write_text(json.dumps(tok))
        _bad(tmp_path, capsys, _union(m["a"], str(broken)), "broken/tokenizer.json",
             "added_tokens[0] is not a token entry")
    assert m_a.exists()


def test_a_tokenizer_source_that_does_not_exist_is_named_as_a_config_key(models, tmp_path, capsys):
    """Was "nothere/tokenizer.json: not found; merging vocabularies needs ...", naming no config key."""
    _, m = models
    _bad(tmp_path, capsys, {**_union(m["a"], m["b"]), "tokenizer_source": str(tmp_path / "nothere")},
         "bad.yml: tokenizer_source: model path not found:", "nothere")
    cfg = {**_union(m["a"], m["b"]), "tokenizer": {"source": str(tmp_path / "nothere")}}
    del cfg["tokenizer_source"]
    _bad(tmp_path, capsys, cfg, "tokenizer.source: model path not found:")
    cfg["tokenizer"] = {"source": None}  # was merged as union; mergekit refuses it
    _bad(tmp_path, capsys, cfg, "tokenizer.source is null; give base, union or a model")


def test_vocabulary_larger_than_the_embedding(models, tmp_path, capsys):
    _, m = models
    small = write_model(tmp_path / "small", SPECIAL + W + ["<pad>"], perturb_seed=6)
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 20
    (small / "config.json").write_text(json.dumps(cfg))
    _bad(tmp_path, capsys, _union(m["a"], str(small)), "small/tokenizer.json", "larger than its embedding")


def test_token_sources_must_be_models_of_the_merge(models, tmp_path, capsys):
    _, m = models
    _bad(tmp_path, capsys, {**_union(m["a"], m["b"]), "tokenizer_source": None,
                            "tokenizer": {"tokens": {"x1": {"source": m["c"]}}}},
         "bad.yml: tokenizer.tokens['x1'].source", "not one of the models merged")  # the config file named too
    _bad(tmp_path, capsys, {**_union(m["a"], m["b"]), "tokenizer_source": None,
                            "tokenizer": {"tokens": {"x1": {"source": str(tmp_path / "nowhere")}}}},
         "bad.yml: tokenizer.tokens['x1'].source", "(no such folder) is not one of the models merged")
    _bad(tmp_path, capsys, {**_union(m["a"], m["b"]), "tokenizer_source": None,
                            "tokenizer": {"tokens": {"x1": {"source": m["a"]}}}},
         "bad.yml: tokenizer.tokens['x1'].source", "lacks the token 'x1'")
    _bad(tmp_path, capsys, {**_union(m["a"], m["b"]), "tokenizer_source": None,
                            "tokenizer": {"tokens": {"x1": {"force": True}}}},
         "bad.yml: tokenizer.tokens['x1']", "needs a source")
    _bad(tmp_path, capsys, {**_union(m["a"], m["b"]), "tokenizer_source": None, "tokenizer": {"tokens": {
        "x1": {"source": {"kind": "model_token", "model": m["b"], "token_id": 99}}}}}, "token id 99 is out of range")


def test_out_may_not_be_the_tokenizer_source(models, tmp_path, capsys):
    """A `tokenizer_source: <model>` outside the merged models is an input too: --force may not
    replace it, nor OUT lie inside it (plain and `slices:` merges)."""
    _, m = models
    tok = write_model(tmp_path / "tok", SPECIAL + W[:15], perturb_seed=4)
    before = sorted((p.name, p.read_bytes()) for p in tok.iterdir())
    franken = {"merge_method": "passthrough", "slices": [{"sources": [{"model": m["a"], "layer_range": [0, 2]}]}]}
    for i, cfg in enumerate([_union(m["a"], m["b"]), franken]):
        path = tmp_path / f"c{i}.yml"
        path.write_text(yaml.safe_dump({**cfg, "tokenizer_source": str(tok)}, sort_keys=False))
        for out, words in ((tok, "is or holds the tokenizer folder"), (tok / "sub", "lies inside the tokenizer folder")):
            rc, err = run_cli(["merge", path, out, "--quiet", "--force"], capsys)
            assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err, (rc, err)
        assert sorted((p.name, p.read_bytes()) for p in tok.iterdir()) == before
        assert run_cli(["merge", path, tmp_path / f"out{i}", "--quiet"], capsys)[0] == 0


def test_a_tokenizer_source_replaced_while_it_is_merged_is_refused(models, tmp_path, capsys, monkeypatch):
    """Its tokenizer.json is read when the merge is planned, its templates and special_tokens_map.json when
    the output is written: a model installed over it in between (another merge's --force) mixed two
    tokenizers into one output. Now: one line naming it, no OUT (plain and `slices:` merges)."""
    import pymerge.merge
    _, m = models
    real = pymerge.merge.write_side_files
    franken = {"merge_method": "passthrough", "slices": [{"sources": [{"model": m["a"], "layer_range": [0, 2]}]}]}
    for i, cfg in enumerate([_union(m["a"], m["b"]), franken]):
        tok = write_model(tmp_path / f"tok{i}", SPECIAL + W[:15], perturb_seed=4)
        new = write_model(tmp_path / f"new{i}", SPECIAL + W[:15], perturb_seed=5, template=C_TEMPLATE)

        def replace_then_write(*args, tok=tok, new=new, **kwargs):
            os.rename(tok, tok.with_name(tok.name + ".old"))
            os.rename(new, tok)
            return real(*args, **kwargs)
        monkeypatch.setattr(pymerge.merge, "write_side_files", replace_then_write)
        _bad(tmp_path, capsys, {**cfg, "tokenizer_source": str(tok)}, f"{tok} was replaced while it was being merged")


def test_a_tokenizer_source_file_renamed_over_while_it_is_merged_is_refused(models, tmp_path, capsys, monkeypatch):
    """The same with one file renamed over (save_pretrained, a download), the folder staying: the merged
    vocabulary came from the old tokenizer and the template from the new tokenizer_config.json (an audit)."""
    import pymerge.merge
    _, m = models
    real = pymerge.merge.write_side_files
    tok = write_model(tmp_path / "tok", SPECIAL + W[:15], perturb_seed=4)
    new = write_model(tmp_path / "new", SPECIAL + W[:15], perturb_seed=5, template=C_TEMPLATE)

    def rename_over_then_write(*args, **kwargs):
        os.replace(new / "tokenizer_config.json", tok / "tokenizer_config.json")
        return real(*args, **kwargs)
    monkeypatch.setattr(pymerge.merge, "write_side_files", rename_over_then_write)
    _bad(tmp_path, capsys, {**_union(m["a"], m["b"]), "tokenizer_source": str(tok)},
         f"{tok / 'tokenizer_config.json'}: was replaced or rewritten while it was being merged")


def test_out_may_not_be_the_hub_blobs_of_the_tokenizer_source(models, tmp_path, capsys, monkeypatch):
    """A hub ID as `tokenizer_source`: its snapshot's files link into ../../blobs, which the merge reads.
    OUT = that blobs folder with --force was accepted and replaced it, breaking the cached model."""
    _, m = models
    tok = write_model(tmp_path / "tok", SPECIAL + W[:15], perturb_seed=4)
    repo = tmp_path / "hub" / "models--org--tok"
    snap, blobs = repo / "snapshots" / ("a" * 40), repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for f in tok.iterdir():  # as huggingface_hub lays a download out
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f.name))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({**_union(m["a"], m["b"]), "tokenizer_source": "org/tok"}, sort_keys=False))
    before = sorted((p.name, p.read_bytes()) for p in blobs.iterdir())
    for out, words in ((blobs, "is or holds the tokenizer file"), (blobs / "sub", "lies inside the folder of the "
                                                                                "tokenizer file")):
        rc, err = run_cli(["merge", path, out, "--quiet", "--force"], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err, (rc, err)
    assert sorted((p.name, p.read_bytes()) for p in blobs.iterdir()) == before


def test_a_lone_surrogate_is_one_line_before_any_output(models, tmp_path, capsys):
    """A lone surrogate escape ("\\ud800": JSON that Python reads, not Unicode) in a tokenizer.json token
    (the tokenizers library refuses such a file) or in a chat template (written as UTF-8 .jinja): a
    UnicodeEncodeError traceback while writing the output."""
    _, m = models
    b = write_model(tmp_path / "b", SPECIAL + W[:10] + X, perturb_seed=1)
    tok = json.loads((b / "tokenizer.json").read_text())
    tok["model"]["vocab"]["\ud800z"] = tok["model"]["vocab"].pop("x0")
    (b / "tokenizer.json").write_text(json.dumps(tok))  # ensure_ascii: the file holds "\ud800z"
    _bad(tmp_path, capsys, _union(m["a"], str(b)), "b/tokenizer.json", "lone surrogate '\\ud800'")
    c = write_model(tmp_path / "c", SPECIAL + W + ["<pad>"], perturb_seed=2,
                    template="{% for m in messages %}\ud800{% endfor %}")
    for more in ({"chat_template": "auto", "tokenizer_source": None}, {"tokenizer_source": "base"}):
        _bad(tmp_path, capsys, {**_union(str(c), m["a"]), **more}, "c/tokenizer_config.json", "lone surrogate")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("source", ["union", "model"])
def test_a_tokenizer_json_holding_nan_is_one_line(models, tmp_path, capsys, constant, source):
    """Python's json reads NaN and Infinity, the tokenizers library refuses the file: the merge exited 0 and
    wrote a tokenizer.json holding it, which nothing could load (mergekit fails on such a file)."""
    _, m = models
    b = write_model(tmp_path / "b", SPECIAL + W[:10] + X, perturb_seed=1)
    text = (b / "tokenizer.json").read_text()
    (b / "tokenizer.json").write_text(text.replace('"model": {', f'"model": {{"dropout": {constant}, ', 1))
    cfg = _union(m["a"], str(b), tokenizer_source="union" if source == "union" else str(b))
    _bad(tmp_path, capsys, cfg, "b/tokenizer.json", f"holds {constant}, which is not JSON")


def test_shared_or_missing_ids_name_the_file_and_the_token(models, tmp_path, capsys):
    """The output's source tokenizer must number its tokens 0 .. n-1, each once. The error named no file
    and no token, and said "0 .. 6" where the ids ran 0 .. 5."""
    _, m = models
    a = write_model(tmp_path / "a", SPECIAL + W + ["<pad>"])
    tok = json.loads((a / "tokenizer.json").read_text())
    tok["model"]["vocab"]["w3b"] = tok["model"]["vocab"]["w3"]
    (a / "tokenizer.json").write_text(json.dumps(tok))
    _bad(tmp_path, capsys, {**_union(str(a), m["d"]), "tokenizer_source": "base"}, "a/tokenizer.json",
         "tokens 'w3' and 'w3b' share id 6")
    del tok["model"]["vocab"]["w3b"], tok["model"]["vocab"]["w3"]
    (a / "tokenizer.json").write_text(json.dumps(tok))
    _bad(tmp_path, capsys, {**_union(str(a), m["d"]), "tokenizer_source": "base"}, "a/tokenizer.json",
         "no token has id 6 (23 tokens, ids up to 23)")


@pytest.mark.parametrize("tokenizer_source", ["union", "base"])
def test_an_empty_chat_template_is_none(models, tmp_path, capsys, tokenizer_source):
    """`chat_template: ""` was exit 2 ("neither a built-in template ... nor a Jinja template"); mergekit takes it
    for none (an audit against mergekit 0.1.5): the same files as without the key."""
    _, m = models
    outs = {}
    for name, more in (("empty", {"chat_template": ""}), ("absent", {})):
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump({**_union(m["a"], m["b"], **more), "tokenizer_source": tokenizer_source}))
        rc, err = run_cli(["merge", path, tmp_path / name, "--quiet"], capsys)
        assert rc == 0, err
        outs[name] = {f.name: f.read_bytes() for f in (tmp_path / name).iterdir() if f.name != "mergekit_config.yml"}
    assert outs["empty"] == outs["absent"]


def test_bad_chat_template(models, tmp_path, capsys):
    _, m = models
    _bad(tmp_path, capsys, _union(m["a"], m["b"], chat_template="chatmlx"), "chat_template", "chatmlx")
    # a chat template alone is saved into the donor's tokenizer_config.json: one that is not a JSON object was
    # written as {} plus the template, exit 0 (an audit); a union merge already refused it
    odd = write_model(tmp_path / "odd", SPECIAL + W + ["<pad>"], perturb_seed=5)
    (odd / "tokenizer_config.json").write_text("[1]")
    for source in ("base", "union"):
        _bad(tmp_path, capsys, {**_union(str(odd), m["a"], chat_template="chatml"), "tokenizer_source": source},
             "odd/tokenizer_config.json", "is not a JSON object")
    cfg = {k: v for k, v in _union(str(odd), m["a"], chat_template="chatml").items() if k != "tokenizer_source"}
    _bad(tmp_path, capsys, cfg, "odd/tokenizer_config.json", "is not a JSON object")


def test_a_chat_template_over_a_linked_out_tokenizer_config_says_its_settings_are_lost(models, tmp_path, capsys):
    """A donor's tokenizer_config.json linking out of its folder is not copied, with a warning; with `chat_template:`
    the template was saved into {} (tokenizer_class, bos/eos tokens gone) without one (a security audit)."""
    _, m = models
    donor = write_model(tmp_path / "donor", SPECIAL + W + ["<pad>"], perturb_seed=5)
    outside = tmp_path / "elsewhere.json"
    (donor / "tokenizer_config.json").rename(outside)
    (donor / "tokenizer_config.json").symlink_to(outside)
    cfg = {k: v for k, v in _union(str(donor), m["a"], chat_template="chatml").items() if k != "tokenizer_source"}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    rc, err = run_cli(["merge", path, tmp_path / "out", "--quiet"], capsys)
    assert rc == 0, err
    assert f"{donor}/tokenizer_config.json: is a link to a file outside the model folder" in err
    assert "saved without its settings" in err, err
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {}
    assert "im_start" in (tmp_path / "out" / "chat_template.jinja").read_text()


# ---- other executors -------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ranks_write_the_same_merge(parity, tmp_path, capsys):
    """Under a launcher (2 ranks, gloo): the same tensors, bit for bit, and the same tokenizer."""
    assert_two_ranks_write_one_merge(parity / "ties_tokens.yml", tmp_path, capsys,
                                     ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"))


def assert_two_ranks_write_one_merge(cfg, tmp_path, capsys, files):
    """`pymerge merge cfg` in one process and under a 2-rank launcher: the same tensors bit for bit,
    and the same `files`."""
    from test_dist_merge import finish, launch
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(["merge", cfg, one, "--quiet"], capsys)[0] == 0
    codes, lines = finish(launch(2, ["merge", str(cfg), str(two), "--quiet"]))
    assert codes == [0, 0], lines
    a, b = lf.load_folder(one), lf.load_folder(two)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["ties_tokens", "slerp_model_tied", "linear_union_bf16"])
def test_gpu_matches_cpu(parity, name, tmp_path):
    assert_gpu_matches_cpu(parity / f"{name}.yml", tmp_path)


def assert_gpu_matches_cpu(cfg, tmp_path):
    from pymerge.merge import run_merge
    run_merge(cfg, tmp_path / "cpu", device="cpu", quiet=True)
    report = run_merge(cfg, tmp_path / "gpu", device="cuda", quiet=True)
    assert report.device.startswith("cuda")
    a, b = lf.load_folder(tmp_path / "gpu"), lf.load_folder(tmp_path / "cpu")
    assert set(a) == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert close(a[k], b[k]), (cfg.stem, k)


def test_auto_ignores_a_config_template_that_named_template_files_override(tmp_path):
    """transformers reads tokenizer_config.json's template only where the folder holds no template file: with
    additional_chat_templates/NAME.jinja alone, the model has no default template, and mergekit's auto does not
    count it; pymerge counted the config's (a model carrying it twice outvoted another, an audit)."""
    from pymerge.tokenizer.files import read_tokenizer
    c = write_model(tmp_path / "c", SPECIAL + W + ["<pad>"], perturb_seed=2)
    config = json.loads((c / "tokenizer_config.json").read_text())
    config["chat_template"] = "B{{ messages[0]['content'] }}"
    (c / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_tokenizer(c).template() == config["chat_template"]
    (c / "additional_chat_templates").mkdir()
    (c / "additional_chat_templates" / "tool_use.jinja").write_text("T")
    assert read_tokenizer(c).template() is None
    (c / "chat_template.jinja").write_text("D")
    assert read_tokenizer(c).template() == "D"


def _word_level_folder(folder, tensors, config, order) -> dict:
    """folder as a model of `tensors` with a word-level tokenizer of the words in `order`; returns its vocab."""
    from safetensors.torch import save_file
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    vocab = {w: i for i, w in enumerate(order)}
    (folder / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None, "decoder": None, "truncation": None, "padding": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}))
    (folder / "tokenizer_config.json").write_text("{}")
    return vocab


def _half_and_half(tmp_path, a, b, capsys) -> dict:
    """The tensors of a linear merge of a and b at 0.5 each, a the base and the tokenizer's source."""
    from safetensors.torch import load_file
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "base_model": str(a), "dtype": "float32",
                                    "tokenizer_source": "base", "models": [
                                        {"model": str(a), "parameters": {"weight": 0.5}},
                                        {"model": str(b), "parameters": {"weight": 0.5}}]}))
    rc, err = run_cli(["merge", path, tmp_path / "out", "--quiet"], capsys)
    assert rc == 0, err
    return load_file(str(tmp_path / "out" / "model.safetensors"))


def test_phi1_head_rows_are_indexed_by_token(tmp_path, capsys):
    """phi-1 / phi-1.5's MixFormerSequential head (layers.{n + 1}.linear) was merged by position, not by token
    (mergekit's phi-1 layout marks it token-indexed; an audit). Only in that layout: another model's
    layers.N.linear (Zamba2's hybrid layers) is no vocabulary tensor."""
    from pymerge.tokenizer.vocab import is_vocab_tensor
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)]

    def phi1(name, order, seed):
        f = tmp_path / name
        f.mkdir()
        g = torch.Generator().manual_seed(seed)
        t = {"layers.0.wte.weight": torch.randn(len(words), 16, generator=g),
             "layers.1.mixer.Wqkv.weight": torch.randn(48, 16, generator=g), "layers.2.ln.weight": torch.ones(16),
             "layers.2.linear.weight": torch.randn(len(words), 16, generator=g),
             "layers.2.linear.bias": torch.randn(len(words), generator=g)}
        return f, t, _word_level_folder(f, t, {"model_type": "mixformer-sequential", "n_layer": 1,
                                               "vocab_size": len(words), "n_embd": 16}, order)
    a, ta, va = phi1("a", words, 0)
    b, tb, vb = phi1("b", words[:3] + words[3:][::-1], 1)  # the same tokens, other ids
    out = _half_and_half(tmp_path, a, b, capsys)
    for name in ("layers.0.wte.weight", "layers.2.linear.weight", "layers.2.linear.bias"):
        want = torch.stack([(ta[name][va[w]] + tb[name][vb[w]]) / 2 for w in words])
        torch.testing.assert_close(out[name], want, rtol=1e-6, atol=1e-6, msg=name)
    assert not is_vocab_tensor("layers.3.linear.weight")  # outside that layout


@pytest.mark.parametrize("head", ["lm_head", "cls.predictions", "predictions"])  # RoBERTa, BERT, ALBERT
def test_masked_lm_output_bias_copies_are_indexed_by_token(tmp_path, capsys, head):
    """RoBERTa's and BERT's masked-LM checkpoints as transformers 4 saved them hold the output bias twice:
    <head>.bias and its tied copy <head>.decoder.bias, the one a loaded model adds. The copy was merged by
    position (1.22 off the per-token mean; an audit), and refused where the vocabularies differ in size."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(13)]

    def mlm(name, order, seed):
        f = tmp_path / name
        f.mkdir()
        g = torch.Generator().manual_seed(seed)
        bias = torch.randn(len(order), generator=g)
        t = {"embeddings.word_embeddings.weight": torch.randn(len(order), 8, generator=g),
             f"{head}.decoder.weight": torch.randn(len(order), 8, generator=g),
             f"{head}.bias": bias, f"{head}.decoder.bias": bias.clone()}
        return f, t, _word_level_folder(f, t, {"model_type": "bert", "vocab_size": len(order), "hidden_size": 8,
                                               "num_hidden_layers": 0}, order)
    a, ta, va = mlm("a", words, 0)
    b, tb, vb = mlm("b", words[:3] + words[3:][::-1] + ["x1", "x2"], 1)  # the same tokens, other ids, and more
    out = _half_and_half(tmp_path, a, b, capsys)
    for name in ("embeddings.word_embeddings.weight", f"{head}.bias", f"{head}.decoder.bias", f"{head}.decoder.weight"):
        want = torch.stack([(ta[name][va[w]] + tb[name][vb[w]]) / 2 for w in words])
        torch.testing.assert_close(out[name], want, rtol=1e-6, atol=1e-6, msg=name)


def test_a_tokenizer_source_in_mergekits_mapping_form_is_that_model(models, tmp_path, capsys):
    """mergekit takes {model: ..., lora: ...} wherever a model goes: tokenizer_source, tokenizer.source and a
    token's source; pymerge took it under models: only and refused it there (an audit)."""
    _, m = models

    def merged(name, **tok):
        cfg = {"merge_method": "linear", "base_model": m["a"], "models": [
            {"model": m["a"], "parameters": {"weight": 0.6}}, {"model": m["b"], "parameters": {"weight": 0.4}}],
            "dtype": "float32", **tok}
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        rc, err = run_cli(["merge", path, tmp_path / name, "--quiet"], capsys)
        assert rc == 0, err
        return lf.load_folder(tmp_path / name), (tmp_path / name / "tokenizer.json").read_bytes()

    for plain, mapped in (
            ({"tokenizer_source": m["b"]}, {"tokenizer_source": {"model": m["b"]}}),
            ({"tokenizer": {"source": m["b"], "tokens": {"<|im_start|>": {"source": m["b"], "force": True}}}},
             {"tokenizer": {"source": {"model": m["b"]},
                            "tokens": {"<|im_start|>": {"source": {"model": {"path": m["b"]}}, "force": True}}}})):
        (want, want_tok), (got, got_tok) = merged("plain", **plain), merged("mapped", **mapped)
        assert got_tok == want_tok
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        shutil.rmtree(tmp_path / "plain"), shutil.rmtree(tmp_path / "mapped")


def test_an_unknown_chat_template_name_is_named_once():
    """"c.yml: chat_template: chat_template 'x' is neither ..." said the key twice (an audit of the docs)."""
    from pymerge.errors import MergeConfigError
    from pymerge.tokenizer.templates import resolve_template
    with pytest.raises(MergeConfigError, match=r"^c.yml: chat_template: 'nonexistent_name' is neither a built-in"):
        resolve_template("nonexistent_name", lambda: [], "c.yml: chat_template")
