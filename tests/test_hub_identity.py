"""A Hub model's identity carries the commit a load would use, so files made from an older
commit of the repository (other weights, another chat template) are never reused for it."""

import pytest

SHA_OLD, SHA_NEW = "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hub cache holding org/chat at SHA_OLD (main) and SHA_NEW (tag v2)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--org--chat"
    for sha in (SHA_OLD, SHA_NEW):
        (repo / "snapshots" / sha).mkdir(parents=True)
        (repo / "snapshots" / sha / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA_OLD)
    (repo / "refs" / "v2").write_text(SHA_NEW)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_offline_the_commit_is_the_cached_snapshot_of_the_revision(hub_cache):
    from stayaligned.fingerprint import hub_commit, model_identity

    assert hub_commit("org/chat") == SHA_OLD
    assert hub_commit("org/chat", "v2") == SHA_NEW
    assert hub_commit("org/chat", "c" * 40) == "c" * 40  # a pinned commit needs no lookup
    assert hub_commit("org/absent") is None
    assert hub_commit("org/chat", "no-such-branch") is None
    assert model_identity("org/chat")["base"] == {
        "hub": "org/chat", "revision": None, "gguf_file": None, "commit": SHA_OLD}


def test_online_the_hub_answers_before_the_cache(hub_cache, monkeypatch):
    import huggingface_hub

    import stayaligned.validate
    from stayaligned.fingerprint import hub_commit

    asked = []

    class Info:
        sha = SHA_NEW

    def model_info(self, repo, revision=None, timeout=None):
        asked.append((repo, revision))
        return Info()

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(stayaligned.validate, "hub_offline", lambda timeout=3.0: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    assert hub_commit("org/chat") == SHA_NEW  # main moved on the Hub: a load downloads it
    assert asked == [("org/chat", None)]

    def unreachable(self, repo, revision=None, timeout=None):
        raise OSError("connection reset")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    assert hub_commit("org/chat") == SHA_OLD  # as from_pretrained, falls back to the cache


def test_a_hub_model_updated_since_the_files_were_made_is_stale():
    from stayaligned.fingerprint import StaleError, check_same

    def made(commit, **extra):
        base = {"hub": "org/chat", "revision": None, "gguf_file": None, **extra}
        return {"model": {"name": "org/chat", "base": base} if commit is False else
                {"name": "org/chat", "base": {**base, "commit": commit}}}

    with pytest.raises(StaleError, match="model.base.commit"):
        check_same("run.json", made(SHA_OLD), made(SHA_NEW))
    check_same("run.json", made(SHA_OLD), made(SHA_OLD))
    # recorded before commits were (or while neither the Hub nor the cache knew it): unknown,
    # so not a difference; anything else in the identity still is
    check_same("run.json", made(False), made(SHA_NEW))
    check_same("run.json", made(None), made(SHA_NEW))
    with pytest.raises(StaleError, match="model.base.revision"):
        check_same("run.json", made(False), made(SHA_NEW, revision="v2"))
    # the same rule for a study's depth reference
    check_same("depth.json", {"reference": made(False)["model"]},
               {"reference": made(SHA_NEW)["model"]})
