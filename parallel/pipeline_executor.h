// The pipeline executor: runs one stage's column of a schedule's action table (pipeline_schedule.h)
// over the pp group, moving the activations between pieces of the model forward and their
// gradients back with asynchronous point-to-point transfers. Piece k of the P V pieces lives on
// stage k % P; the forward of (microbatch, piece k) receives piece k-1's output, the backward
// receives piece k+1's input gradient. Each action's input transfer is posted before the action
// in front of it runs, so it arrives while that one computes, and sends never block the stage
// (a schedule that simulates without deadlock runs without deadlock). Messages are told apart by
// (microbatch, piece, direction) tags.
#pragma once

#include "parallel/communicator.h"
#include "parallel/pipeline_schedule.h"
#include "runtime/backend.h"

namespace braid {

// One stage's pieces of the model, as the executor sees them. The tensors are the stage's own,
// per (microbatch, chunk), and stay valid until that chunk's backward returns.
class PipeStage {
 public:
  virtual ~PipeStage() = default;
  // The piece's input (filled by the executor unless the piece is the model's first) and its
  // output (sent on unless it is the last): one activation's shape.
  virtual Tensor input(int microbatch, int chunk) = 0;
  virtual Tensor output(int microbatch, int chunk) = 0;
  // The gradients of the output (received unless the piece is the last) and of the input (sent
  // back unless it is the first).
  virtual Tensor output_grad(int microbatch, int chunk) = 0;
  virtual Tensor input_grad(int microbatch, int chunk) = 0;
  virtual void forward(int microbatch, int chunk) = 0;
  virtual void backward(int microbatch, int chunk) = 0;
};

// Times of one run on this stage, measured with `timer`'s events on its default stream (on a
// GPU the kernels' time, including the waits for arriving transfers between them).
struct PipeRunStats {
  double busy_s = 0;   // time in forward and backward
  double total_s = 0;  // from the start (after a barrier) to the end of the last action and send
};

// Runs stage pp.rank() of `table` (pp.size() = table.stages); collective over pp.
PipeRunStats run_pipeline(const PipeTable& table, PipeStage& stage, Communicator& pp,
                          Backend& timer);

}  // namespace braid
