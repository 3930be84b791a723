"""The torch-free activation parser agrees with get_activation: same names, same errors, no torch."""

import subprocess
import sys
from pathlib import Path

import pytest

from kernels.activation_spec import canonical_activation
from kernels.activations import get_activation

# spec -> the name get_activation gave before the parser moved out (commit 7485b48).
NAMES = {
    "relu": "relu", "ReLU": "relu", " relu ": "relu", "relu:": "relu", "abs": "abs",
    "leaky_relu": "leaky_relu:0.01", "leaky_relu:": "leaky_relu:0.01", "leaky_relu:0.2": "leaky_relu:0.2",
    "leaky_relu:0": "leaky_relu:0", "leaky_relu:1e-3": "leaky_relu:0.001", "Leaky_ReLU:0.10": "leaky_relu:0.1",
    "abrelu:0,1": "abrelu:0,1", "abrelu:-1,1": "abrelu:-1,1", "abrelu:0.5,2": "abrelu:0.5,2",
    "abrelu:1e-5, 3": "abrelu:1e-05,3", "erf": "erf", "gelu": "gelu", "GELU": "gelu", "identity": "identity",
    "linear": "identity", "tanh": "tanh", "sigmoid": "sigmoid", "softplus": "softplus", "erf:": "erf",
    "tanh:": "tanh",
}
KNOWN = ("known: relu, leaky_relu:<alpha>, abrelu:<a>,<b>, abs, erf, gelu, identity, tanh, sigmoid, softplus, "
         "or a torch callable")
ERRORS = {
    "relu:1": "activation 'relu:1' takes no parameter",
    "sin:1": "activation 'sin:1' takes no parameter",
    "foo": f"unknown activation 'foo'; {KNOWN}",
    "": f"unknown activation ''; {KNOWN}",
    "leaky_relu:nan": "activation 'leaky_relu:nan': expected 1 number(s) after ':'",
    "leaky_relu:1,2": "activation 'leaky_relu:1,2': expected 1 number(s) after ':'",
    "abrelu:1": "activation 'abrelu:1': expected 2 number(s) after ':'",
    "abrelu:a,b": "activation 'abrelu:a,b': expected 2 number(s) after ':'",
    "erf:1": "activation 'erf:1' takes no parameter",
}


@pytest.mark.parametrize("spec", sorted(NAMES))
def test_canonical_name_matches_get_activation(spec):
    assert canonical_activation(spec) == get_activation(spec).name == NAMES[spec]


@pytest.mark.parametrize("spec", sorted(ERRORS) + [3, None])
def test_bad_spec_same_message(spec):
    messages = []
    for parse in (canonical_activation, get_activation):
        with pytest.raises(ValueError) as err:
            parse(spec)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    if isinstance(spec, str):
        assert messages[0] == ERRORS[spec]


def test_parser_imports_no_torch():
    code = "import sys, kernels.activation_spec; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
