"""Meshes, logical sharding rules and plan validation. Imports no other rung package."""

from sharding.errors import ConfigError, MeshTooLarge, flag
from sharding.mesh import (AXES, BATCH_AXES, axis_size, describe, make_mesh, mesh_flags,
                           resolve_shape, respell_mesh_flags)
from sharding.rules import (DEFAULT_RULES, LogicalConstraint, Rules, idle_axes,
                            logical_to_spec, normalize_rules, split_size, tree_shardings,
                            unsplit_dims)
from sharding.validate import validate_plan, validate_serving_plan
from sharding.report import format_bytes, format_rows, json_ready, path_name, sharding_table
from sharding import chips
from sharding.distributed import (describe_process, initialize as initialize_distributed,
                                  to_host)
