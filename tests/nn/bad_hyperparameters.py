"""Bad values for the numeric / flag hyperparameters of the kk.nn constructors, and the error
the shared validators of ``kron_kernels.ops._common`` give for each: a TypeError for a value
of the wrong kind (a bool, a string, a tensor, None, a float as a count), a ValueError for
one out of range or not finite. Every message starts with the argument's name."""
import re

import pytest
import torch

NAN, INF = float("nan"), float("inf")

_WRONG_TYPE = [("bool", True), ("str", "4"), ("tensor", torch.tensor(4)), ("none", None)]

KINDS = {
    # a count or a size: int >= 1
    "positive_int": _WRONG_TYPE + [
        ("false", False), ("float-int", 2.0), ("float", 2.5), ("nan", NAN), ("inf", INF),
        ("zero", 0), ("negative", -3),
    ],
    # an offset or an index: int >= 0
    "non_negative_int": _WRONG_TYPE + [("float-int", 2.0), ("nan", NAN), ("inf", INF), ("negative", -1)],
    # a dropout probability in [0, 1)
    "dropout": [("bool", True), ("str", "0.1"), ("tensor", torch.tensor(0.1)), ("none", None),
                ("nan", NAN), ("inf", INF), ("negative", -0.1), ("one", 1.0), ("above-one", 1.5)],
    # any finite number (a scale)
    "finite": [("bool", True), ("str", "1.0"), ("tensor", torch.tensor(1.0)), ("none", None),
               ("nan", NAN), ("inf", INF), ("-inf", -INF)],
    # a flag
    "bool": [("int", 1), ("int-zero", 0), ("str", "yes"), ("none", None), ("float", 1.0),
             ("tensor", torch.tensor(True))],
}

_VALUE_ERRORS = {"zero", "negative", "one", "above-one"}


def error_for(kind: str, label: str) -> type:
    """The exception the validators raise for value ``label`` of a hyperparameter of ``kind``."""
    if label in _VALUE_ERRORS:
        return ValueError
    if label in ("nan", "inf", "-inf") and kind in ("dropout", "finite"):
        return ValueError  # a float, out of range or not finite
    return TypeError


def cases(**arguments):
    """``pytest.param(argument, value, error)`` for every bad value of every ``argument=kind``
    (``kind`` a key of :data:`KINDS`, or ``(kind, labels to skip)`` where a value is valid)."""
    params = []
    for argument, kind in arguments.items():
        kind, skip = (kind, ()) if isinstance(kind, str) else kind
        for label, value in KINDS[kind]:
            if label not in skip:
                params.append(pytest.param(argument, value, error_for(kind, label), id=f"{argument}-{label}"))
    return params


def names_argument(name: str) -> str:
    """The ``match`` pattern of a validator's message for argument ``name``."""
    return rf"^{re.escape(name)} must be "
