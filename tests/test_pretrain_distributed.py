"""pretrain.distributed: which torchrun attempts get a store key space of their own."""

from pretrain.distributed import SHARED_STORE_FIX, attempt_prefix, multi_node_restart_warning

ONE_AGENT = {"TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "1", "TORCHELASTIC_MAX_RESTARTS": "3"}


def test_each_restart_of_one_torchrun_agent_gets_its_own_prefix():
    prefixes = {attempt_prefix({**ONE_AGENT, "TORCHELASTIC_RESTART_COUNT": str(n)}) for n in range(4)}
    assert len(prefixes) == 4 and None not in prefixes
    assert attempt_prefix(ONE_AGENT) == attempt_prefix({**ONE_AGENT, "TORCHELASTIC_RESTART_COUNT": "0"})
    assert multi_node_restart_warning(ONE_AGENT) is None


def test_a_fresh_store_per_attempt_needs_no_prefix():
    assert attempt_prefix({}) is None  # no torchrun: deepspeed launcher, SLURM, one process
    assert attempt_prefix({**ONE_AGENT, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None  # sharing switched off


def test_several_agents_get_no_prefix_and_one_line_when_they_may_restart():
    nodes = {**ONE_AGENT, "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert attempt_prefix(nodes) is None  # their restart counts differ: a prefix would split the ranks
    warning = multi_node_restart_warning(nodes)
    assert warning is not None and SHARED_STORE_FIX in warning and "\n" not in warning
    assert multi_node_restart_warning({**nodes, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
