"""Adapters in ``cubelm serve`` (multi-LoRA), driven by the official ``openai`` client: an adapter's name as the
``model``, ``/v1/models``, the runtime load/unload routes (behind the API key), 404/400 in OpenAI's error shape, and
``--lora-modules`` checked at startup (one-line error, exit 2)."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY, ServeProcess

EOS_OFF = {"ignore_eos": True}


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    from cubelm.finetune.config import LoraConfig
    from lora_helpers import make_adapter
    root = tmp_path_factory.mktemp("serve_adapters")
    return {"sql": make_adapter(model_dir, root / "sql", LoraConfig(r=8, lora_alpha=16), seed=1),
            "chat": make_adapter(model_dir, root / "chat", LoraConfig(r=4, target_modules=("q_proj", "v_proj")),
                                 seed=2),
            "late": make_adapter(model_dir, root / "late", LoraConfig(r=4, target_modules=("o_proj",)), seed=3),
            "r32": make_adapter(model_dir, root / "r32", LoraConfig(r=32), seed=4)}


@pytest.fixture(scope="module")
def server(model_dir, adapters):
    p = ServeProcess(model_dir, "--api-key", API_KEY, "--lora-modules", f"sql={adapters['sql']}",
                     "--lora-modules", f"chat={adapters['chat']}", "--max-loras", "2", "--max-lora-rank", "16",
                     "--enable-runtime-lora").start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def complete(client, model: str, prompt: str = "def add(") -> str:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body=EOS_OFF)
    assert r.model == model and r.usage.completion_tokens == 8
    return r.choices[0].text


def test_models_lists_the_adapters_with_the_base_as_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == ["m", "sql", "chat"]
    assert cards["m"].parent is None and cards["sql"].parent == "m" and cards["chat"].parent == "m"


def test_adapter_as_model_equals_the_offline_engine(client, model_dir, adapters):
    """Each request alone (same batch shapes both ways) gives the offline ``LLM``'s greedy text on that adapter."""
    from cubelm.engine.llm import LLM
    from cubelm.engine.lora import LoRARequest
    from cubelm.engine.params import SamplingParams
    served = {name: complete(client, name) for name in ("m", "sql", "chat")}
    llm = LLM(str(model_dir), enable_lora=True, num_blocks=256, log=lambda m: None)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for name in ("m", "sql", "chat"):
        lora = None if name == "m" else LoRARequest(name, str(adapters[name]))
        assert llm.generate("def add(", params, lora_request=lora, use_tqdm=False)[0].outputs[0].text == served[name]
    assert served["sql"] != served["m"]
    chunks = list(client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True, extra_body=EOS_OFF))
    assert chunks[0].model == "chat" and chunks[-1].choices[0].finish_reason == "length"


def test_unknown_model_is_404_and_adapters_tokenize(client, server):
    with pytest.raises(openai.NotFoundError, match="'sql'"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    r = httpx.post(f"{server.base}/tokenize", json={"model": "sql", "prompt": "def"},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and r.json()["count"] > 0


def test_runtime_load_and_unload(client, server, adapters, tmp_path):
    def post(route, body, key=API_KEY):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{server.base}/v1/{route}", json=body, headers=headers, timeout=60)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}  # OpenAI's error shape
        return r

    assert post("load_lora_adapter", {"lora_name": "late", "lora_path": str(adapters["late"])}, key=None
                ).status_code == 401
    r = post("load_lora_adapter", {"lora_name": "late", "lora_path": str(adapters["late"])})
    assert r.status_code == 200 and r.json()["id"] == "late" and r.json()["parent"] == "m"
    assert [m.id for m in client.models.list().data] == ["m", "sql", "chat", "late"]
    complete(client, "late")
    taken = post("load_lora_adapter", {"lora_name": "late", "lora_path": str(adapters["chat"])})
    assert taken.status_code == 400 and taken.json()["error"]["param"] == "lora_name"
    assert post("load_lora_adapter", {"lora_name": "m", "lora_path": str(adapters["chat"])}).status_code == 400
    for path, reason in ((tmp_path / "absent", "not an adapter directory"),
                         (adapters["r32"], "above --max-lora-rank 16")):
        bad = post("load_lora_adapter", {"lora_name": "bad", "lora_path": str(path)})
        assert bad.status_code == 400 and reason in bad.json()["error"]["message"], bad.text
    assert post("load_lora_adapter", {"lora_name": "", "lora_path": "x"}).status_code == 400
    assert post("unload_lora_adapter", {"lora_name": "late"}).json() == {"id": "late", "object": "model",
                                                                          "deleted": True}
    with pytest.raises(openai.NotFoundError):
        complete(client, "late")
    assert post("unload_lora_adapter", {"lora_name": "late"}).status_code == 404
    assert [m.id for m in client.models.list().data] == ["m", "sql", "chat"]
    assert complete(client, "sql")  # the others are untouched


def test_runtime_routes_need_the_flag(model_dir):
    """Without --enable-runtime-lora the routes do not exist (and are not in the OpenAPI document)."""
    from fastapi.testclient import TestClient

    from cubelm.serve.app import create_app
    from cubelm.serve.commands import ServeOptions
    from cubelm.serve.state import ServerState
    app = create_app(ServerState(ServeOptions(model=str(model_dir), served_model_name="m")))
    paths = app.openapi()["paths"]
    assert "/v1/load_lora_adapter" not in paths and "/v1/unload_lora_adapter" not in paths
    r = TestClient(app).post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "b"})  # no lifespan
    assert r.status_code == 404 and "error" in r.json()


def _cli(capsys, *args) -> tuple[int, str]:
    from cubelm.cli import main
    code = main(["serve", *args])
    return code, capsys.readouterr().err.strip()


def test_bad_lora_modules_fail_at_startup_in_one_line(model_dir, adapters, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapters["chat"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    lacking = tmp_path / "lacking"
    shutil.copytree(adapters["chat"], lacking)
    cfg = json.loads((lacking / "adapter_config.json").read_text()) | {"target_modules": ["c_attn"]}
    (lacking / "adapter_config.json").write_text(json.dumps(cfg))
    cases = [(["--lora-modules", f"a={tmp_path / 'absent'}"], "not an adapter directory"),
             (["--lora-modules", f"a={corrupt}"], "not a readable safetensors file"),
             (["--lora-modules", f"a={adapters['r32']}"], "above --max-lora-rank 16"),
             (["--lora-modules", f"a={lacking}"], "targets c_attn"),
             (["--lora-modules", "just-a-name"], "NAME=PATH"),
             (["--lora-modules", f"m={adapters['chat']}", "--served-model-name", "m"], "base model's name"),
             (["--max-loras", "4", "--max-cpu-loras", "2"], "--max-cpu-loras")]
    for args, needle in cases:
        code, err = _cli(capsys, "--model", str(model_dir), *args)
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("cubelm: error: "), err
        assert needle in err and "Traceback" not in err, err


def test_exit_code_2_from_the_command_line(model_dir, tmp_path):
    r = ServeProcess(model_dir, "--lora-modules", f"a={tmp_path / 'absent'}").proc
    _, err = r.communicate(timeout=120)
    assert r.returncode == 2 and err.strip().startswith("cubelm: error: --lora-modules a:"), err
