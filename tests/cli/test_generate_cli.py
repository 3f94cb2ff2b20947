"""`cfm-generate` (configurable_fm/cli/generate.py, config experiments/generate.py): the streamed text equals
`generate_text`'s for a prompt on the command line, for each line of stdin, and through the chat template; bad
input is one line on stderr with status 1."""
import io
import sys
from pathlib import Path

import pytest

from configurable_fm.cli.generate import main
from configurable_fm.interop.hf import to_hf
from configurable_fm.interop.tokenizers import ChatTokenizer
from configurable_fm.models.generation import generate_text
from configurable_fm.models.llama import LlamaConfig
from tests.helpers import char_tokenizer, random_llama

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "experiments" / "generate.py")
TEMPLATE = "{% for m in messages %}<bos>{{ m.role }}:{{ m.content }}<eos>{% endfor %}" \
           "{% if add_generation_prompt %}<bos>assistant:{% endif %}"
CFG = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=128)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(HF directory with tokenizer files and chat template, the model, its ChatTokenizer)."""
    chat = ChatTokenizer(char_tokenizer(), {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}, TEMPLATE)
    model = random_llama(CFG, 4)
    out = to_hf(model, tmp_path_factory.mktemp("gen") / "hf", tokenizer=chat)
    return out, model, chat


def generate(*args):
    return main(["--config", CONFIG, *args])


def fails(*args) -> None:
    with pytest.raises(SystemExit) as e:
        generate(*args)
    assert e.value.code == 1


# Prompts of 20 tokens ('Hi' through the template, or 20 characters plain) and 9 new tokens where the case allows:
# one compiled program each for generate_text and the stream (greedy), shared by the tests below.
def test_a_prompt_streams_generate_texts_answer(exported, capsys):
    out, model, chat = exported
    assert generate(f"--config.input={out}", "--config.prompt=Hi", "--config.max_new_tokens=9",
                    "--config.chunk=2") == 0
    want = generate_text(model, chat, "Hi", max_new_tokens=9)
    assert capsys.readouterr().out == want + "\n"
    assert generate(f"--config.input={out}", "--config.prompt=The cat sat on a mat", "--config.chat=false",
                    "--config.max_new_tokens=9") == 0
    want = generate_text(model, chat, "The cat sat on a mat", max_new_tokens=9, chat=False)
    assert capsys.readouterr().out == want + "\n"
    assert generate(f"--config.input={out}", "--config.prompt=Hi", "--config.system=Be brief.",
                    "--config.max_new_tokens=5", "--config.temperature=0.9", "--config.top_k=20",
                    "--config.seed=3") == 0
    import jax
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    want = generate_text(model, chat, conversation, max_new_tokens=5, temperature=0.9, top_k=20,
                         rng=jax.random.key(3))
    assert capsys.readouterr().out == want + "\n"


def test_stop_strings_end_the_answer(exported, capsys):
    out, model, chat = exported
    free = generate_text(model, chat, "Hi", max_new_tokens=9)
    stop = free[-2:]
    want = generate_text(model, chat, "Hi", max_new_tokens=9, stop=stop)
    assert want == free[:free.find(stop)] and want != free
    assert generate(f"--config.input={out}", "--config.prompt=Hi", "--config.max_new_tokens=9",
                    f"--config.stop={stop}") == 0  # one string
    assert capsys.readouterr().out == want + "\n"
    assert generate(f"--config.input={out}", "--config.prompt=Hi", "--config.max_new_tokens=9",
                    f"--config.stop=({stop!r}, '\\u2603')") == 0  # a tuple literal
    assert capsys.readouterr().out == want + "\n"


def test_stdin_lines_are_prompts_of_their_own(exported, capsys, monkeypatch):
    out, model, chat = exported
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n\nYo\n"))
    assert generate(f"--config.input={out}", "--config.max_new_tokens=9") == 0
    want = [generate_text(model, chat, p, max_new_tokens=9) for p in ("Hi", "Yo")]
    assert want[0] != want[1]
    assert capsys.readouterr().out == "".join(w + "\n" for w in want)


@pytest.mark.parametrize("args, message", [
    (["--config.temperature=-1"], "config.temperature=-1.0 must be >= 0"),
    (["--config.temperature=nan"], "config.temperature=nan must be >= 0"),  # was a ValueError traceback
    (["--config.top_k=5"], "set config.temperature > 0"),
    (["--config.chat=maybe"], "config.chat='maybe'"),
    (["--config.dtype=int8"], "config.dtype='int8'"),
    (["--config.stop=('a', '')"], "config.stop=('a', ''): expected non-empty strings"),
])
def test_bad_values_are_one_line(exported, capsys, args, message):
    out = exported[0]
    fails(f"--config.input={out}", "--config.prompt=Hi", *args)
    err = capsys.readouterr().err
    assert err.startswith("cfm-generate: error: ") and message in err and "Traceback" not in err


def test_a_source_without_tokenizer_is_named(exported, capsys, tmp_path):
    from configurable_fm.interop import orbax_io
    out, model, _ = exported
    orbax_io.save_model(model, tmp_path / "ckpt")
    fails(f"--config.input={tmp_path / 'ckpt'}", "--config.prompt=Hi")
    assert "comes without a tokenizer; give one with --config.tokenizer=" in capsys.readouterr().err
    assert generate(f"--config.input={tmp_path / 'ckpt'}", f"--config.tokenizer={out}", "--config.prompt=Hi",
                    "--config.max_new_tokens=3") == 0
    assert capsys.readouterr().out.endswith("\n")
    (tmp_path / "bare").mkdir()
    char_tokenizer().save(str(tmp_path / "bare" / "tokenizer.json"))  # no chat template: chat=true is refused
    fails(f"--config.input={tmp_path / 'ckpt'}", f"--config.tokenizer={tmp_path / 'bare' / 'tokenizer.json'}",
          "--config.chat=true", "--config.prompt=Hi")
    assert "has no chat template; use --config.chat=auto or false" in capsys.readouterr().err
    fails("--config.input=/nonexistent/model", "--config.prompt=Hi")
    assert "cannot load a model from" in capsys.readouterr().err
