import os
import re

import pytest

from rdmakv.core.config import OTHER_VARIABLES, SETTINGS, Config, other_variable
from rdmakv.core.errors import ConfigError


def test_defaults():
    config = Config.load({})
    assert (config.role, config.num_workers, config.partition_bytes, config.transport) == \
        ("worker", 1, 4 << 20, "auto")


def test_precedence_keyword_then_rdmakv_then_dmlc():
    env = {"DMLC_NUM_WORKER": "4", "RDMAKV_NUM_WORKERS": "3", "BYTEPS_PARTITION_BYTES": "8192",
           "DMLC_ENABLE_RDMA": "ibverbs", "DMLC_ROLE": "server"}
    config = Config.load(env)
    assert config.num_workers == 3 and config.partition_bytes == 8192 and config.transport == "verbs"
    assert config.role == "server" and config.sources["num_workers"] == "RDMAKV_NUM_WORKERS"
    assert Config.load(env, num_workers=2).num_workers == 2


@pytest.mark.parametrize("env,message", [
    ({"DMLC_NUM_WORKER": "two"}, "DMLC_NUM_WORKER='two'"),
    ({"DMLC_NUM_SERVER": "0"}, "num_servers must be >= 1"),
    ({"DMLC_ROLE": "boss"}, "DMLC_ROLE='boss'"),
    ({"RDMAKV_TRANSPORT": "carrier-pigeon"}, "RDMAKV_TRANSPORT"),
    ({"DMLC_NUM_WORKER": "2", "DMLC_WORKER_ID": "2"}, "worker_id 2 is outside 0..1"),
    ({"RDMAKV_TIMEOUT": "-1"}, "RDMAKV_TIMEOUT"),
    ({"DMLC_PS_ROOT_PORT": "70000"}, "not a TCP port"),
    ({"RDMAKV_SERVER_MEMORY": "lots"}, "RDMAKV_SERVER_MEMORY='lots'"),
    ({"RDMAKV_SERVER_MEMORY": "0"}, "must be > 0"),
])
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Config.load(env)


def test_server_memory_takes_binary_suffixes():
    for text, expected in (("64G", 64 << 30), ("512MiB", 512 << 20), ("1.5T", 3 << 39), ("4096", 4096)):
        assert Config.load({"RDMAKV_SERVER_MEMORY": text}).server_memory == expected
    assert Config.load({}).server_memory is None       # the server then uses this machine's memory


def test_unknown_keyword_is_refused():
    with pytest.raises(ConfigError, match="unknown setting"):
        Config.load({}, num_wrokers=2)


def test_every_setting_is_documented_in_the_readme():
    import os
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for name, (variables, *_rest) in SETTINGS.items():
        for variable in variables:
            assert f"`{variable}`" in readme, f"{variable} ({name}) is not in the README"


@pytest.mark.parametrize("variable,closest", [("RDMAKV_NUM_WORKER", "RDMAKV_NUM_WORKERS"),
                                              ("RDMAKV_TIMEOUTT", "RDMAKV_TIMEOUT"),
                                              ("RDMAKV_SHM_RING", "RDMAKV_SHM_RING_BYTES")])
def test_a_misspelt_variable_warns_with_the_closest_name(variable, closest):
    with pytest.warns(UserWarning, match=f"{variable} is not an rdmakv setting and is ignored; did you mean {closest}"):
        Config.load({variable: "2"})


def test_an_unknown_variable_far_from_any_name_still_warns():
    with pytest.warns(UserWarning, match="RDMAKV_BANANA is not an rdmakv setting .*python -m rdmakv.info --json. lists the variables"):
        Config.load({"RDMAKV_BANANA": "1"})


def test_known_variables_do_not_warn(recwarn):
    Config.load({"RDMAKV_NUM_WORKERS": "2", "RDMAKV_SHM": "0", "RDMAKV_IB_PORT": "1", "DMLC_NUM_WORKER": "2",
                 "RDMAKV_TRACE_END_STEP": "3"})
    assert not [w for w in recwarn if "rdmakv setting" in str(w.message)]


@pytest.mark.parametrize("value,chosen", [("1", "verbs"), ("ibverbs", "verbs"), ("0", "auto")])
def test_dmlc_enable_rdma_takes_ps_lite_values(value, chosen):
    assert Config.load({"DMLC_ENABLE_RDMA": value}).transport == chosen


def test_dmlc_enable_rdma_names_its_own_values():
    with pytest.raises(ConfigError) as error:
        Config.load({"DMLC_ENABLE_RDMA": "fabric"})
    assert str(error.value).startswith("DMLC_ENABLE_RDMA='fabric': must be 1 or ibverbs (verbs) or 0 (auto)")
    with pytest.raises(ConfigError, match="RDMAKV_TRANSPORT='fabric': must be auto, verbs, tcp or shm"):
        Config.load({"RDMAKV_TRANSPORT": "fabric"})


def test_every_setting_is_listed_in_the_kvstore_docstring():
    from rdmakv.worker.kvstore import KVStore
    listed = {line.split()[0] for line in KVStore.__doc__.splitlines()[4:] if line.startswith("    ") and line.split()}
    assert set(SETTINGS) <= listed, set(SETTINGS) - listed


def test_the_transports_read_their_variables_through_config():
    assert other_variable("RDMAKV_SHM", {"RDMAKV_SHM": "0"}) == "0"
    assert other_variable("RDMAKV_IB_PORT", {}) is None
    with pytest.raises(KeyError, match="RDMAKV_SHM_RINGS"):
        other_variable("RDMAKV_SHM_RINGS", {})
    # Nothing else in the package looks an RDMAKV_* variable up itself.
    package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rdmakv")
    direct = re.compile(r"""environ(\.get\(|\[)["']RDMAKV_""")
    readers = [os.path.relpath(os.path.join(folder, name), package)
               for folder, _, names in os.walk(package) for name in names if name.endswith(".py")
               if direct.search(open(os.path.join(folder, name)).read())]
    assert readers == [], readers
    assert {"RDMAKV_SHM", "RDMAKV_SHM_RING_BYTES", "RDMAKV_SHM_ALLOW_UIDS", "RDMAKV_IB_DEVICE", "RDMAKV_IB_PORT",
            "RDMAKV_GID_INDEX"} <= set(OTHER_VARIABLES)


def test_the_mode_setting_is_checked():
    assert Config.load(environ={}).mode == "sync"
    assert Config.load(environ={"RDMAKV_MODE": " Async "}).mode == "async"
    with pytest.raises(ConfigError, match="RDMAKV_MODE='bulk': must be sync or async"):
        Config.load(environ={"RDMAKV_MODE": "bulk"})
    with pytest.raises(ConfigError, match="keyword mode='bulk': must be sync or async"):
        Config.load(environ={}, mode="bulk")
    with pytest.raises(ConfigError, match="mode must be sync or async, got 1"):
        Config.load(environ={}, mode=1)
