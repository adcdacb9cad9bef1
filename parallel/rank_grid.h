// RankGrid: where each rank sits in the parallel layout. The order string lists dimensions from
// fastest- to slowest-varying rank index (default "tp-cp-ep-dp-pp", as in Megatron-LM). Two views
// share the same ranks:
//   dense  (tp, cp, dp, pp)          with world = tp * cp * dp * pp (ep is skipped);
//   expert (etp, ep, edp, pp)        with etp * ep * edp = tp * cp * dp (cp folds into edp).
// A group along one dimension is the set of ranks that differ only in that coordinate.
#pragma once

#include <array>
#include <string>
#include <vector>

namespace braid {

enum class Dim { tp, cp, dp, pp, etp, ep, edp };

struct Layout {
  int tp = 1, cp = 1, ep = 1, dp = 1, pp = 1, etp = 1;
  std::string order = "tp-cp-ep-dp-pp";
  // Megatron-LM's sequence parallelism: with tp > 1, the activations outside the tensor-parallel
  // blocks (residual stream, norms) are split by rows over the tp ranks.
  bool sequence_parallel = false;
  // The pipeline stages' first layers, e.g. "0,4" (empty: the pattern's '|' cuts, else balanced
  // by measured per-layer times; a run records what it used).
  std::string stage_starts;
  // Model chunks per pipeline stage (interleaved schedule, Megatron-LM's virtual stages): the
  // layers are cut into pp * virtual_stages pieces, piece c pp + s on stage s.
  int virtual_stages = 1;
  // Data-parallel gradient buckets of about this many MB of f32 gradients, summed while the
  // backward goes on (GradBuckets); 0: the gradients are reduced after the backward. Off by
  // default: on 2 H200s (NVLink) hybrid_1b.yaml's step took 1.44 s with 25 MB buckets and 1.43 s
  // with the reduction after the backward (2026-11-22); slower links may favour buckets.
  double grad_bucket_mb = 0;
};

class RankGrid {
 public:
  // Validates the layout against the world size; errors name the constraint that fails.
  RankGrid(const Layout& layout, int world_size);

  int world_size() const { return world_; }
  int coord(int rank, Dim d) const;
  int size(Dim d) const;
  // All ranks that share every coordinate of `rank` except along `d`, ordered by that coordinate.
  std::vector<int> group(int rank, Dim d) const;

 private:
  // The dense and expert views as (sizes, dims) from fastest to slowest.
  struct View {
    std::array<Dim, 4> dims;
    std::array<int, 4> sizes;
  };
  int coord_in(const View& v, int rank, Dim d) const;
  std::vector<int> group_in(const View& v, int rank, Dim d) const;

  Layout layout_;
  int world_ = 1, edp_ = 1;
  View dense_{}, expert_{};
};

}  // namespace braid
