#include "parallel/launch_env.h"

#include <cstdlib>
#include <string>

#include "runtime/check.h"

namespace braid {
namespace {

int parse_int(const char* name, const char* value) {
  char* end = nullptr;
  const long v = std::strtol(value, &end, 10);
  BRAID_REQUIRE(end != value && *end == '\0' && v >= 0 && v < (1 << 24), "environment variable ",
                name, "='", value, "' is not a valid rank or size");
  return static_cast<int>(v);
}

const char* std_getenv(const char* name) {
  return std::getenv(name);
}

}  // namespace

LaunchEnv read_launch_env(const char* (*getenv_fn)(const char*)) {
  struct Source {
    const char *label, *rank, *size, *local;
  };
  const Source sources[] = {
      {"Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"},
      {"SLURM", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"},
      {"environment", "RANK", "WORLD_SIZE", "LOCAL_RANK"},
  };
  LaunchEnv env;
  for (const Source& s : sources) {
    const char* rank = getenv_fn(s.rank);
    const char* size = getenv_fn(s.size);
    if (!rank || !size) continue;
    env.rank = parse_int(s.rank, rank);
    env.world_size = parse_int(s.size, size);
    const char* local = getenv_fn(s.local);
    env.local_rank = local ? parse_int(s.local, local) : 0;
    env.source = s.label;
    BRAID_REQUIRE(env.world_size >= 1 && env.rank < env.world_size, s.rank, "=", env.rank,
                  " must be below ", s.size, "=", env.world_size);
    return env;
  }
  return env;
}

LaunchEnv read_launch_env() {
  return read_launch_env(&std_getenv);
}

}  // namespace braid
