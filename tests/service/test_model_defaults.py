"""Config fields a request leaves out get defaults that fit its model (group size, seqlen): through the API, the
client CLI and the dashboard's form, so that a first try on the shipped model runs."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest

from wkvq_core.config import RECOMMENDED_CALIB, default_group_size

from .conftest import team_key
from .processes import REPO, service_env

TINY_CONFIG = {"nsamples": 4, "epochs": 1, "crr_k": 2}  # no group_size, no seqlen
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9}


def test_default_group_size_divides_every_linear_input():
    assert default_group_size(SMOLLM2_SHAPE) == 64  # 576 = 9 x 64
    assert default_group_size({"hidden_size": 4096, "intermediate_size": 11008}) == 128
    assert default_group_size({"hidden_size": 64, "intermediate_size": 172}) == -1  # stories260k: 172 = 4 x 43


def test_left_out_fields_get_the_models_defaults(live_server, service):
    headers = {"Authorization": f"Bearer {team_key(service, 'a')}"}
    body = {"model": {"source": "local", "name": "stories260k"}, "calibration": {"source": "builtin",
                                                                               "name": "tinystories"}}
    with httpx.Client(base_url=live_server, headers=headers, timeout=60) as api:
        created = api.post("/v1/jobs", json=body | {"config": TINY_CONFIG})
        assert created.status_code == 201, created.text
        config = created.json()["config"]
        assert (config["group_size"], config["seqlen"]) == (-1, 512)  # stories260k: 172 = 4 x 43, 512 positions
        assert created.json()["estimate"]["inputs"]["seqlen"] == 512
        chosen = api.post("/v1/jobs", json=body | {"config": TINY_CONFIG | {"group_size": 4, "seqlen": 64}})
        assert (chosen.json()["config"]["group_size"], chosen.json()["config"]["seqlen"]) == (4, 64)
        refused = api.post("/v1/jobs", json=body | {"config": TINY_CONFIG | {"group_size": 128}})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "config", "group_size"]


def test_left_out_crr_k_is_the_methods_and_stored(live_server, service):
    headers = {"Authorization": f"Bearer {team_key(service, 'a')}"}
    body = {"model": {"source": "local", "name": "stories260k"}, "calibration": {"source": "builtin",
                                                                               "name": "tinystories"}}
    stored = {}
    with httpx.Client(base_url=live_server, headers=headers, timeout=60) as api:
        for method, crr_k in (("recommended", None), ("paper", None), ("recommended", 3)):
            config = {"nsamples": 4, "epochs": 1, "method": method} | ({} if crr_k is None else {"crr_k": crr_k})
            created = api.post("/v1/jobs", json=body | {"config": config})
            assert created.status_code == 201, created.text
            job = api.get(f"/v1/jobs/{created.json()['id']}").json()
            stored[method, crr_k] = (job["config"]["crr_k"], job["estimate"]["inputs"]["crr_k"])
    assert stored == {("recommended", None): (RECOMMENDED_CALIB["crr_k"],) * 2, ("paper", None): (5, 5),
                      ("recommended", 3): (3, 3)}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_wkvq_submit_without_options_fits_the_shipped_model(live_server, service, tmp_path):
    env = service_env("sqlite://", tmp_path) | {"WKVQ_URL": live_server, "WKVQ_API_KEY": team_key(service, "a")}
    result = subprocess.run([sys.executable, "-m", "worker.cli", "submit", "stories260k", "--calib",
                              "builtin:tinystories", "--nsamples", "4", "--epochs", "1", "--json"],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    config = httpx.get(f"{live_server}/v1/jobs", headers={"Authorization": f"Bearer {env['WKVQ_API_KEY']}"},
                       timeout=30).json()["data"][0]["config"]
    assert (config["group_size"], config["seqlen"]) == (-1, 512)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_new_job_form_leaves_model_defaults_to_the_model(live_server, service):
    key = team_key(service, "a")
    with httpx.Client(base_url=live_server, timeout=60) as browser:
        browser.post("/dashboard/signin", data={"api_key": key})
        form = browser.get("/dashboard/jobs/new").text
        for field in ("group_size", "seqlen"):
            tag = re.search(rf'<input id="{field}"[^>]*>', form).group(0)
            assert 'value=""' in tag and 'placeholder="from the model"' in tag, tag
        fields = {"model": "stories260k", "preset": "W4KV4", "group_size": "", "nsamples": "4", "seqlen": "",
                  "epochs": "1", "crr_k": "2", "seed": "0", "gpu_class": "default", "calib_source": "builtin",
                  "builtin_name": "tinystories"}
        posted = browser.post("/dashboard/jobs/new", data=fields)
        assert posted.status_code == 303, posted.text
        job_id = posted.headers["location"].rsplit("/", 1)[1]
        config = browser.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()["config"]
        assert (config["group_size"], config["seqlen"]) == (-1, 512)
