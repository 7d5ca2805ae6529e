"""Properties of boot spec normalisation and identity."""

from __future__ import annotations

from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from llama_actors import BootSpec, BootSpecError, boot_spec
from llama_actors._llama.boot_spec import FIELDS, TIMING_FIELDS
from llama_actors.testing import strategies as las


@given(las.valid_spec_mappings())
def test_normalisation_is_idempotent(mapping: dict[str, Any]) -> None:
    spec = boot_spec(mapping)
    assert boot_spec(spec) == spec
    assert boot_spec(spec.to_mapping()) == spec
    assert boot_spec(spec.to_mapping()).instance_key == spec.instance_key


@given(st.one_of(las.spec_like_mappings(), las.json_like()))
def test_any_json_like_input_gives_a_spec_or_a_boot_spec_error(value: Any) -> None:
    try:
        result = boot_spec(value)
    except BootSpecError as exc:
        assert isinstance(exc.field, str)
        assert str(exc)
    else:
        assert isinstance(result, BootSpec)


@given(st.sampled_from(FIELDS), las.json_like())
def test_any_value_in_any_field_gives_a_spec_or_a_boot_spec_error(field: str, value: Any) -> None:
    try:
        result = boot_spec({"model": "/models/m.gguf", field: value})
    except BootSpecError as exc:
        assert exc.field.split(".")[0].split("[")[0].split(":")[0] in (field, "alias")
    else:
        assert isinstance(result, BootSpec)


@given(
    las.valid_spec_mappings(),
    las.field_values("metadata"),
    st.fixed_dictionaries({name: las.field_values(name) for name in TIMING_FIELDS}),
)
def test_the_instance_key_ignores_metadata_and_timing(
    mapping: dict[str, Any], metadata: dict[str, Any], timing: dict[str, Any]
) -> None:
    assert (
        boot_spec(mapping).instance_key
        == boot_spec({**mapping, "metadata": metadata, **timing}).instance_key
    )


@given(st.data())
def test_the_instance_key_changes_with_every_identity_field(data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(sorted(las.IDENTITY_FIELD_VALUES)), label="field")
    mapping = data.draw(las.valid_spec_mappings(), label="spec")
    a = boot_spec({**mapping, field: data.draw(las.field_values(field), label="a")})
    b = boot_spec({**mapping, field: data.draw(las.field_values(field), label="b")})
    assume(getattr(a, field) != getattr(b, field))
    assert a.instance_key != b.instance_key
