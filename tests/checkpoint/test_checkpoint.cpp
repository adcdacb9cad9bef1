// Checkpoints: exact round trip of parameters, fp32 masters and Adam moments; a corrupt file is
// caught by its digest before HDF5 reads it; strict keys report missing and unexpected names;
// only committed steps are found; pruning and retention of every M-th; discovery falls back
// past a corrupt newest step; verify names a dataset that does not match its digest; external
// links and filtered datasets are refused; config differences.
#include <gtest/gtest.h>

#include <hdf5.h>

#include <filesystem>
#include <fstream>

#include "checkpoint/checkpoint.h"
#include "layers/model/model.h"
#include "optim/adamw.h"
#include "tests/test_util.h"

namespace braid {
namespace {
namespace fs = std::filesystem;

ModelConfig small(const std::string& pattern) {
  ModelConfig c;
  c.pattern = pattern;
  c.d_model = 16;
  c.vocab_size = 32;
  c.mamba2.heads = 4, c.mamba2.head_dim = 8, c.mamba2.d_state = 8, c.mamba2.chunk = 4;
  c.attention = {0, 2, 1, 8, true, 10000.0};
  c.mlp.ffn = 24;
  c.moe.experts = 4, c.moe.ffn = 8, c.moe.score = RouterScore::sigmoid, c.moe.balance_bias = true;
  return c;
}

struct TrainState {
  std::unique_ptr<Backend> backend = make_cpu_backend();
  Model model;
  AdamW opt;
  TrainState(const std::string& pattern, uint64_t seed)
      : model(small(pattern), DType::f32, *backend, 1, 4),
        opt((model.initialize(seed), model.params()), {}, *backend) {}
  // One optimizer step on synthetic gradients, so masters and moments are non-trivial.
  void step() {
    for (Param& p : model.params().all())
      if (p.trainable)
        for (int64_t i = 0; i < p.grad.numel(); ++i)
          p.grad.ptr<float>()[i] = float((i * 37 % 11) - 5) * 0.01f;
    opt.step(1e-2, opt.grad_norm());
  }
};

using test::TempDir;

// Flips one byte in the middle of a file.
void flip_byte(const std::string& file) {
  const auto at = static_cast<std::streamoff>(fs::file_size(file) / 2);
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  char c;
  f.seekg(at);
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x5a);
  f.seekp(at);
  f.write(&c, 1);
}

using test::error_of;

TEST(Checkpoint, RoundTripIsExact) {
  TempDir root;
  TrainState a("M*E", 1);
  a.step();
  a.step();
  const std::string dir =
      save_checkpoint(root.str(), {2, 16, 1, {{"model.d_model", "16"}}}, a.model.params(), a.opt);
  EXPECT_EQ(fs::path(dir).filename(), "step_00000002");
  EXPECT_EQ(latest_checkpoint(root.str()), dir);
  TrainState b("M*E", 99);  // different initial values
  load_checkpoint(dir, b.model.params(), b.opt);
  EXPECT_EQ(b.opt.steps_taken(), 2);
  for (size_t i = 0; i < a.model.params().all().size(); ++i) {
    const Tensor &x = a.model.params().all()[i].value, &y = b.model.params().all()[i].value;
    EXPECT_EQ(std::memcmp(x.data, y.data, x.nbytes()), 0) << a.model.params().all()[i].name;
  }
  for (size_t i = 0; i < a.opt.state().size(); ++i) {
    const auto &x = a.opt.state()[i], &y = b.opt.state()[i];
    EXPECT_EQ(std::memcmp(x.master.data, y.master.data, x.master.nbytes()), 0);
    EXPECT_EQ(std::memcmp(x.m.data, y.m.data, x.m.nbytes()), 0);
    EXPECT_EQ(std::memcmp(x.v.data, y.v.data, x.v.nbytes()), 0);
  }
  // The next step is identical too (bias correction restored).
  a.step();
  b.step();
  const Tensor &x = a.model.params().all()[0].value, &y = b.model.params().all()[0].value;
  EXPECT_EQ(std::memcmp(x.data, y.data, x.nbytes()), 0);
  const CheckpointMeta meta = read_checkpoint_meta(dir);
  EXPECT_EQ(meta.consumed_samples, 16);
  EXPECT_EQ(meta.config.at("model.d_model"), "16");
}

TEST(Checkpoint, CorruptFileIsRejectedByDigest) {
  TempDir root;
  TrainState a("M-", 1);
  const std::string dir = save_checkpoint(root.str(), {1, 0, 1, {}}, a.model.params(), a.opt);
  const std::string file = dir + "/rank_00000.h5";
  flip_byte(file);
  const std::string e = error_of([&] { load_checkpoint(dir, a.model.params(), a.opt); });
  EXPECT_NE(e.find("rank_00000.h5 is corrupt"), std::string::npos) << e;
  fs::remove(file);
  EXPECT_NE(error_of([&] { load_checkpoint(dir, a.model.params(), a.opt); }).find("is missing"),
            std::string::npos);
}

TEST(Checkpoint, StrictKeysNameMissingAndUnexpected) {
  TempDir root;
  TrainState a("M-", 1);
  const std::string dir = save_checkpoint(root.str(), {1, 0, 1, {}}, a.model.params(), a.opt);
  TrainState b("M*", 1);
  const std::string e = error_of([&] { load_checkpoint(dir, b.model.params(), b.opt); });
  const size_t missing = e.find("missing "), unexpected = e.find("; unexpected ");
  ASSERT_NE(missing, std::string::npos) << e;
  ASSERT_NE(unexpected, std::string::npos) << e;
  const size_t q = e.find("param/layers.1.mixer.q_proj.weight"),
               g = e.find("param/layers.1.mixer.gate_proj.weight");
  EXPECT_TRUE(q > missing && q < unexpected) << e;
  EXPECT_TRUE(g != std::string::npos && g > unexpected) << e;
}

TEST(Checkpoint, OnlyCommittedStepsAreFoundAndPruningKeepsNewest) {
  TempDir root;
  TrainState a("-", 1);
  for (int64_t s : {1, 2, 3, 4})
    save_checkpoint(root.str(), {s, 0, 1, {}}, a.model.params(), a.opt);
  fs::create_directories(fs::path(root.str()) / "step_00000009.tmp-1234");  // interrupted save
  fs::create_directories(fs::path(root.str()) / "step_00000008");           // no manifest
  EXPECT_EQ(fs::path(latest_checkpoint(root.str())).filename(), "step_00000004");
  prune_checkpoints(root.str(), 2);
  EXPECT_FALSE(fs::exists(fs::path(root.str()) / "step_00000002"));
  EXPECT_TRUE(fs::exists(fs::path(root.str()) / "step_00000003"));
  EXPECT_FALSE(fs::exists(fs::path(root.str()) / "step_00000009.tmp-1234"));
  EXPECT_EQ(latest_checkpoint(root.str() + "/nothing"), "");
}

TEST(Checkpoint, RetentionKeepsTheNewestAndEveryMth) {
  TempDir root;
  TrainState a("-", 1);
  for (int64_t s = 1; s <= 6; ++s)
    save_checkpoint(root.str(), {s, 0, 1, {}}, a.model.params(), a.opt);
  prune_checkpoints(root.str(), 2, 3);  // the newest 2, and every multiple of 3
  std::vector<std::string> left;
  for (const std::string& d : committed_checkpoints(root.str()))
    left.push_back(fs::path(d).filename().string());
  EXPECT_EQ(left, (std::vector<std::string>{"step_00000006", "step_00000005", "step_00000003"}));
}

TEST(Checkpoint, DiscoveryFallsBackPastACorruptNewestStep) {
  TempDir root;
  TrainState a("-", 1);
  for (int64_t s : {1, 2}) save_checkpoint(root.str(), {s, 0, 1, {}}, a.model.params(), a.opt);
  flip_byte(root.str() + "/step_00000002/rank_00000.h5");
  std::vector<std::string> skipped;
  EXPECT_EQ(fs::path(latest_valid_checkpoint(root.str(), &skipped)).filename(), "step_00000001");
  ASSERT_EQ(skipped.size(), 1u);
  EXPECT_NE(skipped[0].find("step_00000002': file rank_00000.h5 is corrupt"), std::string::npos)
      << skipped[0];
  EXPECT_EQ(latest_valid_checkpoint(root.str() + "/nothing", nullptr), "");
}

// Edits a checkpoint's file with libhdf5 and gives the manifest the file's new digest, so that
// only the checks after the file digest can tell.
template <typename Edit>
void edit_and_rehash(const std::string& dir, Edit&& edit) {
  const std::string file = dir + "/rank_00000.h5", old_sha = sha256_file(file);
  const hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  edit(f);
  H5Fclose(f);
  const std::string mpath = dir + "/manifest.json";
  std::ifstream in(mpath);
  std::string manifest((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t at = manifest.find(old_sha);
  ASSERT_NE(at, std::string::npos);
  manifest.replace(at, old_sha.size(), sha256_file(file));
  std::ofstream(mpath) << manifest;
}

TEST(Checkpoint, LinksFiltersAndExternalStorageAreRefused) {
  TempDir root;
  TrainState a("-", 1);
  const std::string name = a.model.params().all()[0].name;
  const int64_t n = a.model.params().all()[0].value.numel();
  // An external link in place of a dataset: libhdf5 would read another file.
  std::string dir = save_checkpoint(root.str(), {1, 0, 1, {}}, a.model.params(), a.opt);
  edit_and_rehash(dir, [&](hid_t f) {
    ASSERT_GE(H5Ldelete(f, ("/param/" + name).c_str(), H5P_DEFAULT), 0);
    ASSERT_GE(H5Lcreate_external("/elsewhere.h5", "/x", f, ("/param/" + name).c_str(), H5P_DEFAULT,
                                 H5P_DEFAULT),
              0);
  });
  std::string e = error_of([&] { load_checkpoint(dir, a.model.params(), a.opt); });
  EXPECT_NE(e.find("/param/" + name + " in rank_00000.h5 is an external link"), std::string::npos)
      << e;
  EXPECT_NE(error_of([&] { verify_checkpoint(dir); }).find("external link"), std::string::npos);
  // A dataset behind a filter pipeline (deflate here; a plugin filter would run foreign code).
  dir = save_checkpoint(root.str(), {2, 0, 1, {}}, a.model.params(), a.opt);
  edit_and_rehash(dir, [&](hid_t f) {
    const std::string ds = "/param/" + name;
    std::vector<float> v(n);
    const hid_t old = H5Dopen2(f, ds.c_str(), H5P_DEFAULT);
    H5Dread(old, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
    H5Dclose(old);
    H5Ldelete(f, ds.c_str(), H5P_DEFAULT);
    const hsize_t dims[1] = {static_cast<hsize_t>(n)};
    const hid_t space = H5Screate_simple(1, dims, nullptr), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, 1, dims);
    H5Pset_deflate(dcpl, 1);
    const hid_t d =
        H5Dcreate2(f, ds.c_str(), H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    ASSERT_GE(d, 0);
    H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data());
    H5Dclose(d), H5Pclose(dcpl), H5Sclose(space);
  });
  e = error_of([&] { verify_checkpoint(dir); });
  EXPECT_NE(e.find("/param/" + name + " in rank_00000.h5 is filtered"), std::string::npos) << e;
}

TEST(Checkpoint, VerifyReadsEveryDatasetAndNamesTheOneAtFault) {
  TempDir root;
  TrainState a("M-", 1);
  a.step();
  const std::string dir = save_checkpoint(root.str(), {1, 0, 1, {}}, a.model.params(), a.opt);
  const CheckpointSummary ok = verify_checkpoint(dir);
  const size_t n = a.model.params().all().size();
  EXPECT_EQ(ok.tensors.at("param"), static_cast<int64_t>(n));
  EXPECT_EQ(ok.meta.step, 1);
  EXPECT_EQ(inspect_checkpoint(dir).bytes, ok.bytes);
  // Change one value of one dataset: only the dataset's own digest can tell.
  const std::string ds = "/param/" + a.model.params().all()[0].name;
  edit_and_rehash(dir, [&](hid_t f) {
    const hid_t d = H5Dopen2(f, ds.c_str(), H5P_DEFAULT);
    ASSERT_GE(d, 0);
    std::vector<float> v(a.model.params().all()[0].value.numel());
    ASSERT_GE(H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), 0);
    v[0] += 1.f;
    ASSERT_GE(H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), 0);
    H5Dclose(d);
  });
  const std::string e = error_of([&] { verify_checkpoint(dir); });
  EXPECT_NE(e.find("dataset " + ds + " in rank_00000.h5 does not match its digest"),
            std::string::npos)
      << e;
}

// Pieces of tensors (as ZeRO-1 ranks hold them): a tensor split in runs reads back whole; a gap or
// an overlap refuses the save, naming the tensor and the elements.
TEST(Checkpoint, PiecesCoverEveryTensorExactlyOnce) {
  TempDir root;
  std::vector<float> w(24), b(5);
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.5f * float(i) - 3.f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = float(i);
  const std::vector<CheckpointPiece> ok = {
      {"master", "w", DType::f32, {4, 6}, 0, 10, w.data()},
      {"master", "w", DType::f32, {4, 6}, 10, 14, w.data() + 10},
      {"master", "b", DType::f32, {5}, 0, 5, b.data()}};
  const std::string dir = save_checkpoint_sharded(root.str(), {3, 0, 1, {}}, ok, nullptr);
  std::vector<float> w2(24, -1.f), b2(5, -1.f);
  load_checkpoint(
      dir,
      {{"master", "w", Tensor::contiguous_view(w2.data(), DType::f32, Device::cpu, {4, 6}, "w")},
       {"master", "b", Tensor::contiguous_view(b2.data(), DType::f32, Device::cpu, {5}, "b")}});
  EXPECT_EQ(w2, w);
  EXPECT_EQ(b2, b);
  auto gap = ok;
  gap[1].start = 12, gap[1].count = 12, gap[1].data = w.data() + 12;
  std::string e = error_of([&] {
    save_checkpoint_sharded(root.str(), {4, 0, 1, {}}, gap, nullptr);
  });
  EXPECT_NE(e.find("master/w: elements [10, 12) are written by no rank"), std::string::npos) << e;
  auto twice = ok;
  twice[1].start = 8, twice[1].count = 16, twice[1].data = w.data() + 8;
  e = error_of([&] { save_checkpoint_sharded(root.str(), {5, 0, 1, {}}, twice, nullptr); });
  EXPECT_NE(e.find("master/w: elements [8, 10) are written twice"), std::string::npos) << e;
  EXPECT_EQ(fs::path(latest_checkpoint(root.str())).filename(), "step_00000003");
}

// Box pieces (tensor-parallel shards, whole or in ZeRO-1 runs): a [6,8] tensor saved as two
// column shards, one in two runs, reads back whole, and as any other box and run (row shards);
// overlapping shards refuse the save; a box outside the tensor is an error naming the piece.
TEST(Checkpoint, BoxPiecesReadBackOnAnyLayout) {
  TempDir root;
  const int64_t R = 6, K = 8;
  std::vector<float> w(R * K);  // logical [6,8]
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.25f * float(i) - 5.f;
  // The column shards as their ranks hold them: [6,4] each, row-major.
  std::vector<float> left, right;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k) (k < 4 ? left : right).push_back(w[r * K + k]);
  const std::vector<CheckpointPiece> pieces = {
      {"master", "w", DType::f32, {R, K}, 0, 10, left.data(), {0, 0}, {R, 4}},
      {"master", "w", DType::f32, {R, K}, 10, 14, left.data() + 10, {0, 0}, {R, 4}},
      {"master", "w", DType::f32, {R, K}, 0, 24, right.data(), {0, 4}, {R, 4}}};
  const std::string dir = save_checkpoint_sharded(root.str(), {1, 0, 1, {}}, pieces, nullptr);
  verify_checkpoint(dir);
  std::vector<float> whole(R * K, -1.f);
  load_checkpoint(dir,
                  {{"master", "w",
                    Tensor::contiguous_view(whole.data(), DType::f32, Device::cpu, {R, K}, "w")}});
  EXPECT_EQ(whole, w);
  // Rows 2..4 of all columns, elements [5, 17) of that box; and the right shard whole.
  std::vector<float> rows(12, -1.f), expect_rows(w.begin() + 2 * K + 5, w.begin() + 2 * K + 17);
  std::vector<float> right2(24, -1.f);
  load_checkpoint_ranges(dir,
                         {{"master", "w", DType::f32, {R, K}, 5, 12, rows.data(), {2, 0}, {3, K}}});
  load_checkpoint_ranges(
      dir, {{"master", "w", DType::f32, {R, K}, 0, 24, right2.data(), {0, 4}, {R, 4}}});
  EXPECT_EQ(rows, expect_rows);
  EXPECT_EQ(right2, right);
  auto overlap = pieces;
  overlap[2].box_offset = {0, 3}, overlap[2].box_shape = {R, 5};
  std::vector<float> wide(30, 0.f);
  overlap[2].count = 30, overlap[2].data = wide.data();
  std::string e = error_of([&] {
    save_checkpoint_sharded(root.str(), {2, 0, 1, {}}, overlap, nullptr);
  });
  EXPECT_NE(e.find("master/w: elements [3, 4) are written twice"), std::string::npos) << e;
  auto outside = pieces;
  outside[2].box_offset = {0, 5};
  e = error_of([&] { save_checkpoint_sharded(root.str(), {2, 0, 1, {}}, outside, nullptr); });
  EXPECT_NE(e.find("master/w: box [5, 9) of dimension 1 outside its extent 8"), std::string::npos)
      << e;
}

TEST(Checkpoint, ConfigDifferencesListEveryChangedKey) {
  const std::map<std::string, std::string> a{
      {"model.d_model", "16"}, {"moe.experts", "4"}, {"train.steps", "10"}, {"train.seed", "1"}},
      b{{"model.d_model", "32"}, {"moe.experts", "4"}, {"train.steps", "20"}, {"train.seed", "2"}};
  const auto d = config_differences(a, b, {"model.", "moe.", "train.seed"});
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0], "model.d_model: checkpoint 16, this run 32");
  EXPECT_EQ(d[1], "train.seed: checkpoint 1, this run 2");
}

}  // namespace
}  // namespace braid
