"""The environment a test run claims is the one it runs in (make test-numpy2 sets it)."""

import os

import numpy as np


def test_numpy_major_version_is_the_one_asked_for():
    expected = os.environ.get("CASCADE_EXPECT_NUMPY")
    major = int(np.__version__.split(".")[0])
    assert major == int(expected) if expected else major in (1, 2)
