from pathlib import Path

import pytest

from firmware_profiles import ProfileCatalog, ProfileError, default_catalog, load_profile
from firmware_profiles.catalog import BUILTIN_DIR

REQUIRED = [
    "jetson-orin-nano",
    "jetson-xavier-nx",
    "raspberry-pi-4",
    "raspberry-pi-5",
    "x86-64-avx2",
    "x86-64-avx512-vnni",
]


def test_builtin_profiles_load_and_cover_the_required_devices() -> None:
    catalog = default_catalog()
    for name in REQUIRED:
        profile = catalog.get(name)
        assert profile.runtimes and profile.precisions
        assert profile.resources.threads > 0
    assert catalog.get("jetson-orin-nano").accelerator.cuda_sm == "8.7"
    assert catalog.get("jetson-xavier-nx").firmware.jetpack == "5.1"
    assert catalog.get("raspberry-pi-4").runtimes[0].name == "litert"


def _profile_text(**replace: str) -> str:
    text = (BUILTIN_DIR / "x86-64-avx2.toml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("replace", "field"),
    [
        ({"threads = 4": "threads = 0"}, "resources.threads"),
        ({"threads = 4": "threads = 4\nthreadz = 2"}, "resources.threadz"),
        ({'versions = ">=1.17"': 'versions = "not a range"'}, "runtimes.0.versions"),
        ({'family = "x86"': 'family = "mainframe"'}, "family"),
        (
            {'precisions = ["int8", "fp32"]\n\n[firmware]': 'precisions = ["int4"]\n\n[firmware]'},
            "precisions.0",
        ),
    ],
)
def test_errors_name_the_file_and_the_field(
    tmp_path: Path, replace: dict[str, str], field: str
) -> None:
    path = _write(tmp_path, "x86-64-avx2", _profile_text(**replace))
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert "x86-64-avx2.toml" in e.value.message
    assert e.value.fields["field"] == field
    assert field in e.value.message


def test_invalid_toml_and_name_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"broken.toml: not valid TOML"):
        load_profile(_write(tmp_path, "broken", "name = "))
    with pytest.raises(ProfileError, match=r"must match the file name 'other'"):
        load_profile(_write(tmp_path, "other", _profile_text()))


def test_tensorrt_needs_a_cuda_accelerator(tmp_path: Path) -> None:
    text = _profile_text(**{'name = "onnxruntime"': 'name = "tensorrt"'})
    with pytest.raises(ProfileError, match=r"tensorrt.*cuda"):
        load_profile(_write(tmp_path, "x86-64-avx2", text))


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError) as e:
        default_catalog().get("commodore-64")
    assert e.value.reason == "unknown_profile"
    assert "raspberry-pi-5" in e.value.message


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no profile files"):
        ProfileCatalog.load(tmp_path)
