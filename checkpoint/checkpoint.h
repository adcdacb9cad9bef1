// Checkpoints, written by one process or by every rank of a job.
//   <root>/step_<N>/            a committed checkpoint (8-digit N)
//     manifest.json             format version, step, consumed samples, seed, the resolved
//                               configuration, every file with its SHA-256, and for every
//                               tensor its kind, dtype, global shape and pieces {file, dataset,
//                               [box_offset, box_shape,] start, count, sha256}: a run of the
//                               row-major elements of a box of the tensor (no box: all of it)
//     rank_<r>.h5               the pieces rank r held: /<kind>/<name> (a whole tensor, in its
//                               shape), /<kind>/<name>@<o0_o1..> (a whole box, in its shape) or
//                               /<kind>/<name>@[<o0_o1..>:]<start> (a 1-D run); kind in param,
//                               master, exp_avg, exp_avg_sq; logical (unsharded) coordinates
// Saving writes <root>/step_<N>.tmp-<pid>/, fsyncs, and renames it: a reader only ever sees
// complete checkpoints. Loading finds the newest committed step with a manifest, checks the
// SHA-256 of every file before libhdf5 opens it, checks the model configuration, and requires
// the exact set of tensor names (missing and unexpected names are both reported). HDF5 file
// locking is off (set in code), so file systems without locks work.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "layers/model/params.h"
#include "optim/adamw.h"
#include "optim/zero1_adamw.h"
#include "parallel/communicator.h"

namespace braid {

struct CheckpointMeta {
  int64_t step = 0;              // optimizer steps taken
  int64_t consumed_samples = 0;  // global sample number of the next sample
  uint64_t seed = 0;
  std::map<std::string, std::string> config;  // resolved "section.key" -> value
};

// 2: pieces are runs of row-major elements, in any file; 3: runs of the elements of a box
// (a tensor-parallel shard: a ZeRO-1 range of it, or all of it).
constexpr int kCheckpointFormat = 3;

// One logical tensor of a checkpoint: kind (param, master, exp_avg, exp_avg_sq), HF-style name,
// and the host tensor holding (or receiving) its full, unsharded value.
struct CheckpointTensor {
  std::string kind, name;
  Tensor tensor;
};

// Host tensors of the kinds, names, dtypes and shapes of `tensors`, laid out in `buffer` (resized
// to hold them, each at a 64-byte boundary): where a save stages the state it writes.
std::vector<CheckpointTensor> host_layout(const std::vector<CheckpointTensor>& tensors,
                                          std::vector<char>& buffer);

// The training state of a single-process run: every parameter, and the fp32 master weights and
// Adam moments of every trainable one.
std::vector<CheckpointTensor> training_state(const ParamSet& params, const AdamW& opt);

// A part of a logical tensor held by this rank: elements [start, start + count) of the row-major
// flattening of a box of it (box_offset and box_shape per dimension; both empty: the whole
// tensor), read from `data` (count elements of dtype). A tensor-parallel shard is a box; a
// ZeRO-1 rank's part of a parameter is a run of its (box or whole) elements.
struct CheckpointPiece {
  std::string kind, name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;  // of the whole tensor
  int64_t start = 0, count = 0;
  const void* data = nullptr;
  std::vector<int64_t> box_offset = {}, box_shape = {};
};

// Sharded save, collective over world (null: this process alone). Every rank writes the pieces
// it holds to its own rank_<r>.h5 in <root>/step_<N>.tmp-<id>/; rank 0 gathers the pieces and
// file digests, refuses the save unless the pieces of every tensor cover it exactly once (naming
// the tensor and the elements), writes the manifest and commits by rename; no rank returns
// before the commit. Returns the committed directory.
std::string save_checkpoint_sharded(const std::string& root, const CheckpointMeta& meta,
                                    const std::vector<CheckpointPiece>& pieces,
                                    Communicator* world);

// The three phases of save_checkpoint_sharded, for saves written in the background:
// begin_sharded_save (collective: the temporary directory), write_rank_file (this rank's file and
// its report; no communication, so a background thread may run it), commit_sharded_save
// (collective: the reports gathered, the coverage check, the manifest, the rename).
struct ShardedSave {
  std::string root;
  CheckpointMeta meta;
  std::string tmp_dir;
  int rank = 0;
};
ShardedSave begin_sharded_save(const std::string& root, const CheckpointMeta& meta,
                               Communicator* world);
std::string write_rank_file(const ShardedSave& save, const std::vector<CheckpointPiece>& pieces);
std::string commit_sharded_save(const ShardedSave& save, const std::string& report,
                                Communicator* world);

// A run of a logical tensor to read: elements [start, start + count) of the row-major
// flattening of a box of it (as in CheckpointPiece; empty: the whole tensor) into dst (count
// elements of dtype); count 0 only declares that the tensor exists.
struct CheckpointRead {
  std::string kind, name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;  // of the whole tensor, checked against the checkpoint
  int64_t start = 0, count = 0;
  void* dst = nullptr;
  std::vector<int64_t> box_offset = {}, box_shape = {};
};
// Reads the requested runs from pieces on any layout (other boxes, other runs), touching only
// the pieces that intersect them and hashing only the files those pieces are in (before
// libhdf5 opens them); of a 1-D piece only the range spanning what is needed is read. The tensors
// named in `reads` must be exactly the checkpoint's (missing and unexpected ones are reported by
// name), with the same shapes and dtypes.
void load_checkpoint_ranges(const std::string& dir, const std::vector<CheckpointRead>& reads);

// A ZeRO-1 rank's reads of a checkpoint: every parameter whole (into params), and its runs of
// the master weights and moments into shard vectors of opt.shard_size() elements.
std::vector<CheckpointRead> zero1_reads(ParamSet& params, const Zero1AdamW& opt,
                                        std::vector<float>& master, std::vector<float>& m,
                                        std::vector<float>& v);

// What a ZeRO-1 rank writes of a sharded checkpoint: its runs of every trainable parameter's
// master weights and Adam moments, and, with_params (one rank per tensor-parallel shard), every
// parameter (its shard) whole. Under tensor parallelism the parameters every tp rank holds whole
// (norms) are written by one of them: with_replicated false leaves them out.
std::vector<CheckpointPiece> zero1_pieces(const ParamSet& params, const Zero1AdamW& opt,
                                          bool with_params, bool with_replicated = true);

// Writes and commits a checkpoint of `tensors`; returns its directory.
std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta,
                            const std::vector<CheckpointTensor>& tensors);
std::string save_checkpoint(const std::string& root, const CheckpointMeta& meta,
                            const ParamSet& params, const AdamW& opt);
// The newest committed checkpoint directory under root, or "" when there is none.
std::string latest_checkpoint(const std::string& root);
// Committed checkpoint directories (a complete manifest), newest first.
std::vector<std::string> committed_checkpoints(const std::string& root);
// Checks a checkpoint's manifest, format version and every file's SHA-256 (without libhdf5
// opening anything); throws an Error naming the file.
void check_checkpoint_files(const std::string& dir);
// The newest committed checkpoint whose files check out, falling back past corrupt ones (their
// errors appended to *skipped); "" when there is none.
std::string latest_valid_checkpoint(const std::string& root, std::vector<std::string>* skipped);
// What a checkpoint holds: inspect_checkpoint reads the manifest only; verify_checkpoint also
// checks every file and every dataset against its digest, and throws an Error naming the file
// and dataset at fault.
struct CheckpointSummary {
  CheckpointMeta meta;
  std::map<std::string, int64_t> tensors, elements;  // per kind
  int64_t bytes = 0;                                 // of tensor data
  std::vector<std::string> files;
};
CheckpointSummary inspect_checkpoint(const std::string& dir);
CheckpointSummary verify_checkpoint(const std::string& dir);
// Reads every tensor of checkpoint src whole (all checks of verify_checkpoint) and writes the
// same step, metadata and tensors as a one-file checkpoint under dst_root; returns its directory.
std::string convert_checkpoint(const std::string& src, const std::string& dst_root);
CheckpointMeta read_checkpoint_meta(const std::string& dir);
// Reads a checkpoint into `tensors` (exactly the same set of kind/name pairs and shapes).
void load_checkpoint(const std::string& dir, const std::vector<CheckpointTensor>& tensors);
// Loads params and opt, and sets the optimizer's step count from the checkpoint.
void load_checkpoint(const std::string& dir, ParamSet& params, AdamW& opt);
// Keeps the newest `keep` committed checkpoints and those whose step is a multiple of keep_every
// (> 0), and removes the other older ones (and stale .tmp dirs).
void prune_checkpoints(const std::string& root, int64_t keep, int64_t keep_every = 0);
// Lines "key: checkpoint X, this run Y" for every differing key that starts with one of the
// prefixes ("model." for a section, "train.seed" for one key); empty when compatible.
std::vector<std::string> config_differences(const std::map<std::string, std::string>& saved,
                                            const std::map<std::string, std::string>& current,
                                            const std::vector<std::string>& prefixes);

std::string sha256_file(const std::string& path);

}  // namespace braid
