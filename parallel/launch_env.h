// Which process this is, read from the launcher's environment: Open MPI (OMPI_COMM_WORLD_*),
// SLURM (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) or plain RANK / WORLD_SIZE / LOCAL_RANK.
// Inconsistent or malformed variables are errors naming the variable.
#pragma once

#include <string>

namespace braid {

struct LaunchEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string source = "single process";  // which launcher's variables were used
};

// `getenv` is a parameter so tests can supply an environment.
LaunchEnv read_launch_env(const char* (*getenv_fn)(const char*));
LaunchEnv read_launch_env();

}  // namespace braid
