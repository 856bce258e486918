"""ovsam.weights: resolving checkpoint sources and loading untrusted checkpoint files safely."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ovsam.errors import OVSAMError, WeightsError
from ovsam.redaction import redact_uri
from ovsam.weights import CACHE_DIR_ENV, load_state_dict, load_strict, load_tensor, resolve, strip_prefix


def _small_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "fpn_neck.lateral_convs.0.conv.weight": torch.randn(8, 4, 1, 1, generator=generator),
        "fpn_neck.lateral_convs.0.conv.bias": torch.randn(8, generator=generator),
        "mask_decoder.label_token.weight": torch.randn(1, 8, generator=generator),
    }


def _assert_same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


class _CodeOnLoad:
    """Pickles to a call of ``os.system``: a malicious checkpoint would run this command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CustomObject:
    """An arbitrary user class: not a tensor or plain container, so weights_only refuses it."""

    def __init__(self) -> None:
        self.value = 3


def test_round_trip_pth_and_safetensors(tmp_path: Path) -> None:
    state = _small_state()
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    _assert_same_tensors(load_state_dict(tmp_path / "w.pth"), state)
    _assert_same_tensors(load_state_dict(tmp_path / "w.safetensors"), state)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dict_is_unwrapped(tmp_path: Path, wrapper: str) -> None:
    state = _small_state()
    torch.save({wrapper: state, "meta": {"epoch": 12}}, tmp_path / "wrapped.pth")
    _assert_same_tensors(load_state_dict(tmp_path / "wrapped.pth"), state)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "clip2sam.pth"
    with pytest.raises(WeightsError, match="does not exist") as raised:
        resolve(str(missing))
    assert str(missing) in str(raised.value) and "--weights" in str(raised.value)
    with pytest.raises(WeightsError, match="not a readable checkpoint: no such file"):
        load_state_dict(missing)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_zero_byte_file(tmp_path: Path, suffix: str) -> None:
    empty = tmp_path / f"empty{suffix}"
    empty.touch()
    with pytest.raises(WeightsError, match=r"empty\S* is not a readable checkpoint: the file is empty"):
        load_state_dict(empty)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    state = {"weight": torch.randn(64, 64)}
    torch.save(state, whole) if suffix == ".pth" else save_file(state, str(whole))
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(WeightsError, match="is not a readable checkpoint") as raised:
        load_state_dict(truncated)
    assert str(truncated) in str(raised.value)
    assert raised.value.__cause__ is not None  # the library error is chained, not printed
    assert "\n" not in str(raised.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the raw pickle
@pytest.mark.parametrize("legacy_pickle", [False, True], ids=["torch.save", "raw-pickle"])
def test_pickled_code_is_refused_and_never_runs(tmp_path: Path, legacy_pickle: bool) -> None:
    marker = tmp_path / "code-ran"
    payload = {"weight": torch.zeros(2), "trap": _CodeOnLoad(marker)}
    path = tmp_path / "evil.pth"
    if legacy_pickle:
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_state_dict(path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_tensor(path)
    assert not marker.exists()


def test_custom_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "custom.pth"
    torch.save({"weight": torch.zeros(2), "config": _CustomObject()}, path)
    with pytest.raises(WeightsError, match="other than tensors"):
        load_state_dict(path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ({"weight": torch.zeros(2), "epoch": 3}, "entry 'epoch' holds a int"),
        ([torch.zeros(2)], "holds a list, not a dict of tensors"),
        ({}, "holds no tensors"),
    ],
)
def test_not_a_dict_of_tensors(tmp_path: Path, content: object, reason: str) -> None:
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(WeightsError, match=reason):
        load_state_dict(path)


def test_load_tensor(tmp_path: Path) -> None:
    embedding = torch.nn.functional.normalize(torch.randn(5, 2, 64), dim=-1)
    torch.save(embedding, tmp_path / "cls.pth")
    assert torch.equal(load_tensor(tmp_path / "cls.pth"), embedding)
    save_file({"embedding": embedding}, str(tmp_path / "cls.safetensors"))
    assert torch.equal(load_tensor(tmp_path / "cls.safetensors"), embedding)
    torch.save({"embedding": embedding}, tmp_path / "dict.pth")
    with pytest.raises(WeightsError, match="not a single tensor"):
        load_tensor(tmp_path / "dict.pth")


def test_strip_prefix_keeps_only_that_prefix() -> None:
    state = _small_state()
    stripped = strip_prefix(state, "fpn_neck")
    assert set(stripped) == {"lateral_convs.0.conv.weight", "lateral_convs.0.conv.bias"}
    assert stripped["lateral_convs.0.conv.bias"] is state["fpn_neck.lateral_convs.0.conv.bias"]
    assert strip_prefix(state, "mask_decoder.") == {"label_token.weight": state["mask_decoder.label_token.weight"]}
    assert strip_prefix(state, "neck_student") == {}


class _Net(nn.Module):
    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, hidden, 1)
        self.norm = nn.BatchNorm2d(hidden)
        self.head = nn.Linear(hidden, 2)


def test_load_strict_loads_matching_weights_and_tolerates_missing_num_batches_tracked() -> None:
    torch.manual_seed(0)
    source, target = _Net(), _Net()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_strict(target, state, what="test", source="/x/y.pth")
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_strict_names_every_kind_of_mismatch() -> None:
    target = _Net(hidden=4)
    state = dict(_Net(hidden=6).state_dict())
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError) as raised:
        load_strict(target, state, what="clip2sam", source="s3://KEY:SECRET@bucket/w.pth?X-Amz-Signature=abc")
    message = str(raised.value)
    assert message.startswith("clip2sam weights from s3://bucket/w.pth?X-Amz-Signature=REDACTED do not fit this model: ")
    assert "1 missing key (head.bias)" in message
    assert "1 unexpected key (extra.weight)" in message
    assert "conv.weight: file [6,3,1,1] vs model [4,3,1,1]" in message
    assert "shape mismatches (" in message and "Is this the right file for the preset?" in message
    assert "SECRET" not in message and "abc" not in message
    for key, value in target.state_dict().items():  # nothing was half-loaded
        assert torch.equal(value, before[key]), key


def test_load_strict_lists_at_most_eight_names() -> None:
    target = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])  # 12 keys
    with pytest.raises(WeightsError, match=r"12 missing keys \((\d\.\w+, ){7}\d\.\w+, and 4 more\)"):
        load_strict(target, {}, what="sam2clip", source="/w.pth")


def test_weight_sources_are_redacted_by_the_one_project_rule() -> None:
    """Weight sources follow the same redaction as input URIs (ovsam.redaction): credentials and signature
    values go, the rest of the query stays so the message still says which object."""
    assert redact_uri("https://user:pw@host:8443/a/b.pth?token=t&v=2#frag") == \
        "https://host:8443/a/b.pth?token=REDACTED&v=2#frag"
    assert redact_uri("/local/path.pth") == "/local/path.pth"
    import pipelines.storage

    assert pipelines.storage.redact_uri is redact_uri


def test_resolve_local_and_file_url(tmp_path: Path) -> None:
    path = tmp_path / "my weights.pth"
    torch.save(_small_state(), path)
    assert resolve(str(path)) == path
    assert resolve(path.as_uri()) == path
    with pytest.raises(WeightsError, match="does not exist"):
        resolve((tmp_path / "other.pth").as_uri())


def test_fsspec_url_is_cached_and_reused_without_the_source(tmp_path: Path) -> None:
    state = _small_state()
    url = "memory://ovsam-test/release-a/clip2sam.pth"
    other_url = "memory://ovsam-test/release-b/clip2sam.pth"
    for target, tensors in ((url, state), (other_url, {"x": torch.ones(3)})):
        with fsspec.open(target, "wb") as handle:
            torch.save(tensors, handle)
    cache = tmp_path / "cache"
    first = resolve(url, cache_dir=cache)
    assert first.is_relative_to(cache) and first.name == "clip2sam.pth"
    _assert_same_tensors(load_state_dict(first), state)
    second_file = resolve(other_url, cache_dir=cache)
    assert second_file != first  # same file name, different URL: no collision
    assert list(cache.rglob("*.part")) == []  # no temp file left behind

    fsspec.filesystem("memory").rm(url)
    assert resolve(url, cache_dir=cache) == first
    _assert_same_tensors(load_state_dict(first), state)


def test_cache_dir_defaults_to_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVSAM_CACHE_DIR", str(tmp_path / "env-cache"))
    url = "memory://ovsam-test/env/sam2clip.pth"
    with fsspec.open(url, "wb") as handle:
        torch.save(_small_state(), handle)
    assert resolve(url).is_relative_to(tmp_path / "env-cache" / "weights")


def test_missing_remote_object(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="was not found") as raised:
        resolve("memory://ovsam-test/none/clip2sam.pth", cache_dir=tmp_path)
    assert "--weights clip2sam=" in str(raised.value) and "OVSAM_CACHE_DIR" in str(raised.value)
    assert list(tmp_path.rglob("*.part")) == []


def test_unreachable_url_message_has_no_credentials(tmp_path: Path) -> None:
    # Port 9 (discard) on loopback: connection refused at once, no real network involved.
    url = "http://user:hunter2@127.0.0.1:9/weights/clip2sam.pth?X-Amz-Signature=deadbeef"
    with pytest.raises(WeightsError) as raised:
        resolve(url, cache_dir=tmp_path)
    message = str(raised.value)
    assert message.startswith("weights file http://127.0.0.1:9/weights/clip2sam.pth?X-Amz-Signature=REDACTED could not be downloaded: ")
    assert "Cannot connect" in message and "--weights" in message
    assert "hunter2" not in message and "deadbeef" not in message and "user" not in message


def test_s3_download_is_cached(s3_server, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket("ovsam-weights-test")
    url = f"{bucket}/releases/clip2sam_coco_rn50x16.pth"
    state = _small_state()
    with fsspec.open(url, "wb") as handle:
        torch.save(state, handle)
    local = resolve(url, cache_dir=tmp_path)
    _assert_same_tensors(load_state_dict(local), state)
    fsspec.filesystem("s3").rm(url)
    fsspec.filesystem("s3").invalidate_cache()
    assert resolve(url, cache_dir=tmp_path) == local
    with pytest.raises(WeightsError, match="was not found"):
        resolve(f"{bucket}/releases/absent.pth", cache_dir=tmp_path)


def test_hub_offline_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as raised:
        resolve("hf://ovsam-tests/not-cached@main/clip2sam_coco_rn50x16.pth")
    message = str(raised.value)
    assert "HF_HUB_OFFLINE is set" in message and "not in the local Hugging Face cache" in message
    assert "hf://ovsam-tests/not-cached@main/clip2sam_coco_rn50x16.pth" in message
    assert "--weights NAME=PATH" in message
    assert isinstance(raised.value, OVSAMError)


def test_malformed_hub_reference() -> None:
    with pytest.raises(WeightsError, match="not of the form hf://owner/repo/path/in/repo"):
        resolve("hf://only-owner/repo")


def test_import_ovsam_modules_loads_no_storage_library() -> None:
    # huggingface_hub is not checked: open_clip (via timm) imports it whatever ovsam does.
    forbidden = "{'fsspec', 's3fs', 'botocore', 'ray', 'click', 'pyarrow'}"
    code = (
        "import sys, ovsam.weights, ovsam.vocabulary, ovsam.errors; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {forbidden}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


class _NoService:
    """A loopback port that accepts each connection and closes it at once (a host with no working service):
    counts the connections made to it."""

    def __init__(self) -> None:
        import socket
        import threading

        self.connections = 0
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._socket.close()


def test_offline_a_released_preset_names_every_missing_file_at_once(tmp_path: Path, monkeypatch) -> None:
    """No hub, no cache: one message with every role, its source and the --weights option to give; the hub is
    asked once (no retries per file)."""
    import huggingface_hub.constants

    import ovsam

    hub, elsewhere = _NoService(), _NoService()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "ovsam-cache"))
    sam = f"{elsewhere.url}/segment_anything/sam_vit_h_4b8939.pth"  # the preset's https source, on loopback
    try:
        with pytest.raises(WeightsError) as raised:
            ovsam.load_model("coco_rn50x16", weights={"sam": sam}, device="cpu")
    finally:
        hub.close()
        elsewhere.close()
    message = str(raised.value)
    assert message.startswith("4 weight files of this model are not available here"), message
    for role, source in [("sam2clip", "hf://HarborYuan/ovsam_models/sam2clip_vith_rn50x16.pth"),
                         ("clip2sam", "hf://HarborYuan/ovsam_models/clip2sam_coco_rn50x16.pth"),
                         ("sam", sam), ("clip", "hf://timm/resnet50x16_clip.openai/open_clip_pytorch_model.bin")]:
        assert f"{role} = {source} (" in message, (role, message)
    assert ("--weights sam2clip=/PATH/sam2clip_vith_rn50x16.pth --weights clip2sam=/PATH/clip2sam_coco_rn50x16.pth "
            "--weights sam=/PATH/sam_vit_h_4b8939.pth --weights clip=/PATH/open_clip_pytorch_model.bin") in message
    assert message.count("the Hugging Face hub could not be reached") == 3
    assert hub.connections == 1  # one request found out that the hub does not answer, for all three files
