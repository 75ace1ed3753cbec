// erw_sample: sample from an exported erw_fast SiT (an AOTInductor package written by
// `python -m erw_fast.export`) without Python.
//
//   erw_sample model.pt2 --num N --class C --sampler ode-euler|ode-heun|sde --steps S
//              --cfg-scale W [--guidance-interval LO HI] --seed K --out samples.npy
//              [--noise noise.npy] [--grid samples.pgm] [--batch B] [--threads T]
//
// The samplers are those of erw_fast/sampling/samplers.py, step for step: the same float64 time grid
// (ODE: linspace(1, 0, S + 1); SDE: linspace(1, 0.04, S) then 0, the last step drift only), the same
// float32 update expressions in the same order, and the same guidance rule (guided when
// cfg_scale != 1 and LO <= t <= HI, decided inside the package). Random numbers follow
// erw_fast.sampling.sample_noise: sample i of a run with seed K draws its initial noise and its SDE
// noise from its own CPU generator seeded with index_generator(K, i), so the output of --seed K
// equals Python's sample_grid / sample_noise + sample(..., generator=gens) up to float rounding,
// for every sampler, and does not depend on --batch.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "npy.h"

namespace {

constexpr const char* kFormat = "erw_guided_velocity/1";
constexpr double kSdeTEnd = 0.04;  // erw_fast.sampling.SDE_T_END

const char* kUsage =
    "usage: erw_sample MODEL.pt2 --out samples.npy [options]\n"
    "\n"
    "Sample from a SiT exported with `python -m erw_fast.export` (an AOTInductor package).\n"
    "\n"
    "options:\n"
    "  --out PATH                 output .npy, float32 (N, C, H, W) (required)\n"
    "  --num N                    number of samples (default 1, or the first dim of --noise)\n"
    "  --class C                  class id for every sample, 0..num_classes-1; num_classes = the\n"
    "                             null class (unconditional) (default 0)\n"
    "  --sampler NAME             ode-euler | ode-heun | sde (default sde)\n"
    "  --steps S                  integration steps (default 250)\n"
    "  --cfg-scale W              classifier-free guidance scale; 1 = none (default 1)\n"
    "  --guidance-interval LO HI  guide only at times LO <= t <= HI (default 0 1)\n"
    "  --seed K                   seed; sample i uses the generator index_generator(K, i) like\n"
    "                             erw_fast.sampling.sample_noise (default 0)\n"
    "  --noise PATH               initial noise .npy (N, C, H, W) float32/float64 instead of drawing it\n"
    "  --grid PATH                also write a PGM (C != 3) or PPM (C == 3) grid of the samples\n"
    "  --grid-range LO HI         value range mapped to 0..255 in the grid (default: min..max)\n"
    "  --batch B                  samples per model call (default: all, or the package's fixed batch)\n"
    "  --threads T                CPU threads (default: PyTorch's default)\n"
    "  --quiet                    no progress on stderr\n"
    "  -h, --help                 this message\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string package, out, noise, grid, sampler = "sde";
  int64_t num = -1, cls = 0, steps = 250, batch = 0, threads = 0;
  double cfg_scale = 1.0, lo = 0.0, hi = 1.0, grid_lo = 0.0, grid_hi = 0.0;
  int64_t seed = 0;
  bool quiet = false;
};

double parse_double(const std::string& flag, const std::string& s) {
  size_t pos = 0;
  double v;
  try {
    v = std::stod(s, &pos);
  } catch (const std::exception&) {
    throw UsageError(flag + " expects a number, got '" + s + "'");
  }
  if (pos != s.size()) throw UsageError(flag + " expects a number, got '" + s + "'");
  if (!std::isfinite(v)) throw UsageError(flag + " must be finite, got '" + s + "'");
  return v;
}

int64_t parse_int(const std::string& flag, const std::string& s) {
  size_t pos = 0;
  long long v;
  try {
    v = std::stoll(s, &pos);
  } catch (const std::exception&) {
    throw UsageError(flag + " expects an integer, got '" + s + "'");
  }
  if (pos != s.size()) throw UsageError(flag + " expects an integer, got '" + s + "'");
  return static_cast<int64_t>(v);
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> a(argv + 1, argv + argc);
  auto value = [&](size_t& i, const std::string& flag) -> const std::string& {
    if (i + 1 >= a.size() || (a[i + 1].rfind("--", 0) == 0 && a[i + 1].size() > 2 &&
                              !std::isdigit(static_cast<unsigned char>(a[i + 1][2]))))
      throw UsageError(flag + " needs a value");
    return a[++i];
  };
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string& f = a[i];
    if (f == "-h" || f == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (f == "--out") o.out = value(i, f);
    else if (f == "--num") o.num = parse_int(f, value(i, f));
    else if (f == "--class") o.cls = parse_int(f, value(i, f));
    else if (f == "--sampler") o.sampler = value(i, f);
    else if (f == "--steps") o.steps = parse_int(f, value(i, f));
    else if (f == "--cfg-scale") o.cfg_scale = parse_double(f, value(i, f));
    else if (f == "--guidance-interval") {
      o.lo = parse_double(f, value(i, f));
      o.hi = parse_double(f, value(i, f));
    } else if (f == "--seed") o.seed = parse_int(f, value(i, f));
    else if (f == "--noise") o.noise = value(i, f);
    else if (f == "--grid") o.grid = value(i, f);
    else if (f == "--grid-range") {
      o.grid_lo = parse_double(f, value(i, f));
      o.grid_hi = parse_double(f, value(i, f));
      if (!(o.grid_lo < o.grid_hi)) throw UsageError("--grid-range needs LO < HI");
    } else if (f == "--batch") o.batch = parse_int(f, value(i, f));
    else if (f == "--threads") o.threads = parse_int(f, value(i, f));
    else if (f == "--quiet") o.quiet = true;
    else if (f.rfind("-", 0) == 0 && f.size() > 1) throw UsageError("unknown option " + f);
    else if (o.package.empty()) o.package = f;
    else throw UsageError("unexpected argument '" + f + "' (the package path is already '" + o.package + "')");
  }
  if (o.package.empty()) throw UsageError("the model package (MODEL.pt2) is required");
  if (o.out.empty()) throw UsageError("--out is required");
  if (o.sampler != "ode-euler" && o.sampler != "ode-heun" && o.sampler != "sde")
    throw UsageError("--sampler must be ode-euler, ode-heun or sde, got '" + o.sampler + "'");
  if (o.steps < 1) throw UsageError("--steps must be >= 1");
  if (o.num == 0 || o.num < -1) throw UsageError("--num must be >= 1");
  if (o.lo > o.hi) throw UsageError("--guidance-interval needs LO <= HI");
  if (o.batch < 0) throw UsageError("--batch must be >= 1");
  if (o.threads < 0) throw UsageError("--threads must be >= 1");
  return o;
}

// erw_fast.sampling.index_generator: splitmix64 of (seed, index) -> a CPU generator.
at::Generator index_generator(int64_t seed, int64_t index) {
  uint64_t z = static_cast<uint64_t>(seed) * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(index) + 1ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return at::detail::createCPUGenerator(z & 0x7FFFFFFFFFFFFFFFULL);
}

// One standard-normal draw of `shape` per generator, stacked (erw_fast.sampling._randn with a list).
at::Tensor randn_per_sample(std::vector<at::Generator>& gens, at::IntArrayRef shape) {
  std::vector<at::Tensor> parts;
  parts.reserve(gens.size());
  for (auto& g : gens) parts.push_back(at::randn(shape, g, at::TensorOptions().dtype(at::kFloat)));
  return at::stack(parts);
}

std::string meta_get(const std::unordered_map<std::string, std::string>& m, const std::string& key) {
  auto it = m.find(key);
  if (it == m.end())
    throw std::runtime_error("incompatible package: metadata key '" + key +
                             "' is missing (export it with `python -m erw_fast.export`)");
  return it->second;
}

class Velocity {
 public:
  Velocity(torch::inductor::AOTIModelPackageLoader& loader, at::Device device, double cfg, double lo, double hi)
      : loader_(loader), device_(device) {
    auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
    scale_ = at::full({1}, cfg, f64);
    lo_ = at::full({1}, lo, f64);
    hi_ = at::full({1}, hi, f64);
  }
  at::Tensor operator()(const at::Tensor& x, double t, const at::Tensor& y) {
    auto t_in = at::full({1}, t, at::TensorOptions().dtype(at::kDouble).device(device_));
    std::vector<at::Tensor> out = loader_.run({x, t_in, y, scale_, lo_, hi_});
    ++calls;
    if (out.empty() || !out[0].sizes().equals(x.sizes()))
      throw std::runtime_error("the package returned an unexpected output; is it an erw_fast export?");
    return out[0].to(at::kFloat);
  }
  int64_t calls = 0;

 private:
  torch::inductor::AOTIModelPackageLoader& loader_;
  at::Device device_;
  at::Tensor scale_, lo_, hi_;
};

// erw_fast.sampling.time_grid
std::vector<double> time_grid(const std::string& sampler, int64_t steps) {
  at::Tensor g;
  auto f64 = at::TensorOptions().dtype(at::kDouble);
  if (sampler == "sde")
    g = at::cat({at::linspace(1.0, kSdeTEnd, steps, f64), at::zeros({1}, f64)});
  else
    g = at::linspace(1.0, 0.0, steps + 1, f64);
  g = g.contiguous();
  return std::vector<double>(g.data_ptr<double>(), g.data_ptr<double>() + g.numel());
}

// erw_fast.sampling.sample, the same expressions in the same order.
at::Tensor integrate(Velocity& velocity, at::Tensor x, const at::Tensor& y, const std::string& sampler,
                     const std::vector<double>& ts, std::vector<at::Generator>& gens, at::Device device) {
  const size_t n = ts.size();
  for (size_t i = 0; i + 1 < n; ++i) {
    const double t_cur = ts[i], t_next = ts[i + 1];
    const double dt = t_next - t_cur;  // negative
    at::Tensor v = velocity(x, t_cur, y);
    if (sampler == "ode-euler") {
      x = x + dt * v;
    } else if (sampler == "ode-heun") {
      at::Tensor x_pred = x + dt * v;
      at::Tensor v_next = velocity(x_pred, t_next, y);
      x = x + (dt * 0.5) * (v + v_next);
    } else {  // sde: drift x + (2 - t) v, diffusion g^2 = 2t, last step deterministic
      at::Tensor drift = x + (2.0 - t_cur) * v;
      x = x + dt * drift;
      if (i < n - 2) {
        at::Tensor z = randn_per_sample(gens, x.sizes().slice(1)).to(device);
        x = x + std::sqrt(2.0 * t_cur * -dt) * z;
      }
    }
  }
  return x;
}

int run(const Options& o) {
  if (o.threads > 0) at::set_num_threads(static_cast<int>(o.threads));
  {
    std::ifstream probe(o.package, std::ios::binary);
    if (!probe) throw std::runtime_error("model package not found or unreadable: " + o.package);
    char sig[2] = {0, 0};
    probe.read(sig, 2);
    if (sig[0] != 'P' || sig[1] != 'K')
      throw std::runtime_error("incompatible package: " + o.package +
                               " is not an AOTInductor .pt2 archive (not a zip file)");
  }
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  auto t_load = std::chrono::steady_clock::now();
  try {
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(o.package, "model");
  } catch (const std::exception& e) {
    std::string msg = e.what();
    msg = msg.substr(0, msg.find('\n'));  // the loader appends file listings and a C++ trace
    std::string hint;
    if (msg.find("Failed to find") != std::string::npos)
      hint = " -- not an AOTInductor package (a training checkpoint? export it first with "
             "`python -m erw_fast.export --ckpt CKPT --out model.pt2`)";
    throw std::runtime_error("incompatible package " + o.package + ": " + msg + hint);
  }
  auto meta = loader->get_metadata();
  const std::string format = meta.count("erw.format") ? meta.at("erw.format") : "";
  if (format != kFormat)
    throw std::runtime_error("incompatible package " + o.package + ": format '" + format + "', expected '" +
                             kFormat + "' (export it with `python -m erw_fast.export`)");
  const int64_t size = std::stoll(meta_get(meta, "erw.input_size"));
  const int64_t chans = std::stoll(meta_get(meta, "erw.in_channels"));
  const int64_t num_classes = std::stoll(meta_get(meta, "erw.num_classes"));
  const int64_t null_class = std::stoll(meta_get(meta, "erw.null_class"));
  const bool has_null = meta.count("erw.has_null_class") ? meta.at("erw.has_null_class") == "1" : true;
  const std::string batch_meta = meta_get(meta, "erw.batch");
  const std::string dev_name = meta.count("erw.device") ? meta.at("erw.device") : "cpu";
  const at::Device device = dev_name == "cuda" ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
  const int64_t fixed_batch = batch_meta == "dynamic" ? 0 : std::stoll(batch_meta);

  if (o.cls < 0 || o.cls > num_classes || (o.cls == num_classes && !has_null))
    throw UsageError("--class " + std::to_string(o.cls) + " is out of range: valid ids are 0.." +
                     std::to_string(num_classes - 1) +
                     (has_null ? " and " + std::to_string(null_class) + " (null class, unconditional)" : ""));
  if (o.cfg_scale != 1.0 && !has_null)
    throw UsageError("--cfg-scale != 1 needs a null class, and this model was trained without label dropout");

  // initial noise: from --noise, or per-sample generators (erw_fast.sampling.sample_noise)
  at::Tensor noise;
  int64_t num = o.num;
  if (!o.noise.empty()) {
    erw::NpyArray arr = erw::read_npy(o.noise);
    std::vector<int64_t> want = {num > 0 ? num : (arr.shape.empty() ? 0 : arr.shape[0]), chans, size, size};
    if (arr.shape != want)
      throw UsageError("--noise " + o.noise + " has shape " + erw::npy_shape_str(arr.shape) + ", expected " +
                       erw::npy_shape_str(want));
    num = want[0];
    if (num < 1) throw UsageError("--noise holds no samples");
    noise = at::from_blob(arr.data.data(), want, at::TensorOptions().dtype(at::kFloat)).clone();
  }
  if (num < 1) num = 1;
  const int64_t batch = fixed_batch ? fixed_batch : (o.batch > 0 ? o.batch : num);
  if (fixed_batch && o.batch > 0 && o.batch != fixed_batch)
    throw UsageError("this package has a fixed batch of " + std::to_string(fixed_batch) + "; --batch " +
                     std::to_string(o.batch) + " is not possible");

  const std::vector<double> ts = time_grid(o.sampler, o.steps);
  Velocity velocity(*loader, device, o.cfg_scale, o.lo, o.hi);
  at::Tensor result = at::empty({num, chans, size, size}, at::TensorOptions().dtype(at::kFloat));
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t start = 0; start < num; start += batch) {
    const int64_t real = std::min(batch, num - start);
    const int64_t rows = fixed_batch ? fixed_batch : real;  // pad a fixed-batch package's last chunk
    std::vector<at::Generator> gens;
    for (int64_t i = 0; i < rows; ++i) gens.push_back(index_generator(o.seed, start + i));
    at::Tensor x0;
    if (noise.defined()) {
      x0 = noise.narrow(0, start, real);
      if (rows > real) x0 = at::cat({x0, at::zeros({rows - real, chans, size, size}, x0.options())});
    } else {
      x0 = randn_per_sample(gens, {chans, size, size});
    }
    at::Tensor y = at::full({rows}, o.cls, at::TensorOptions().dtype(at::kLong)).to(device);
    at::Tensor x = integrate(velocity, x0.to(device), y, o.sampler, ts, gens, device);
    result.narrow(0, start, real).copy_(x.narrow(0, 0, real).to(at::kCPU));
    if (!o.quiet)
      std::fprintf(stderr, "erw_sample: %lld/%lld samples\n", static_cast<long long>(start + real),
                   static_cast<long long>(num));
  }
  double run_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  result = result.contiguous();
  erw::write_npy(o.out, result.data_ptr<float>(), {num, chans, size, size});
  if (!o.grid.empty())
    erw::write_grid(o.grid, result.data_ptr<float>(), num, chans, size, size, static_cast<float>(o.grid_lo),
                    static_cast<float>(o.grid_hi));
  if (!o.quiet)
    std::fprintf(stderr,
                 "erw_sample: %lld samples, %s, %lld steps, %lld model calls, load %.2fs, sampling %.3fs "
                 "(%.2f samples/s) -> %s\n",
                 static_cast<long long>(num), o.sampler.c_str(), static_cast<long long>(o.steps),
                 static_cast<long long>(velocity.calls), load_s, run_s, num / std::max(run_s, 1e-9),
                 o.out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
    o = parse_args(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "erw_sample: error: %s\n\n%s", e.what(), kUsage);
    return 2;
  }
  try {
    return run(o);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "erw_sample: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    auto cut = msg.find("\nException raised from");
    std::fprintf(stderr, "erw_sample: error: %s\n", msg.substr(0, cut).c_str());
    return 1;
  }
}
