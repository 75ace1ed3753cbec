// Minimal NumPy .npy reader/writer (format 1.0/2.0/3.0, little-endian float32/float64, C order)
// and PGM/PPM grid writer. Header-only, no dependencies beyond the C++ standard library.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace erw {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;  // always converted to float32
};

inline std::string npy_shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << shape[i] << (shape.size() == 1 || i + 1 < shape.size() ? "," : "");
  s << ")";
  return s.str();
}

// Write a float32 C-order array. Throws std::runtime_error on I/O failure.
inline void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': " + npy_shape_str(shape) + ", }";
  // magic(6) + version(2) + header_len(2) + dict + padding + '\n' must be a multiple of 64
  size_t total = 10 + dict.size() + 1;
  size_t pad = (64 - total % 64) % 64;
  dict += std::string(pad, ' ') + "\n";
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path + " for writing");
  const char magic[] = "\x93NUMPY";
  f.write(magic, 6);
  const char ver[2] = {1, 0};
  f.write(ver, 2);
  uint16_t hl = static_cast<uint16_t>(dict.size());
  const char hlb[2] = {static_cast<char>(hl & 0xff), static_cast<char>(hl >> 8)};
  f.write(hlb, 2);
  f.write(dict.data(), static_cast<std::streamsize>(dict.size()));
  size_t n = 1;
  for (auto d : shape) n *= static_cast<size_t>(d);
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(n * sizeof(float)));
  if (!f) throw std::runtime_error("write to " + path + " failed");
}

// Read a little-endian float32 or float64 C-order array (converted to float32).
inline NpyArray read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[8];
  f.read(magic, 8);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + " is not a .npy file");
  uint32_t hl = 0;
  if (magic[6] == 1) {
    unsigned char b[2];
    f.read(reinterpret_cast<char*>(b), 2);
    hl = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4];
    f.read(reinterpret_cast<char*>(b), 4);
    hl = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  }
  std::string header(hl, '\0');
  f.read(&header[0], hl);
  if (!f) throw std::runtime_error(path + ": truncated .npy header");
  auto field = [&](const std::string& key) -> std::string {
    auto p = header.find("'" + key + "'");
    if (p == std::string::npos) throw std::runtime_error(path + ": .npy header lacks " + key);
    p = header.find(':', p);
    return header.substr(p + 1);
  };
  std::string descr = field("descr");
  size_t q1 = descr.find('\''), q2 = descr.find('\'', q1 + 1);
  descr = descr.substr(q1 + 1, q2 - q1 - 1);
  size_t item;
  if (descr == "<f4" || descr == "=f4") item = 4;
  else if (descr == "<f8" || descr == "=f8") item = 8;
  else throw std::runtime_error(path + ": dtype " + descr + " not supported (need little-endian float32 or float64)");
  std::string fo = field("fortran_order");
  if (fo.find("True") < fo.find(',')) throw std::runtime_error(path + ": Fortran-order arrays are not supported");
  std::string sh = field("shape");
  sh = sh.substr(sh.find('(') + 1, sh.find(')') - sh.find('(') - 1);
  NpyArray a;
  std::stringstream ss(sh);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    if (tok.find_first_not_of(" \t") == std::string::npos) continue;
    a.shape.push_back(std::stoll(tok));
  }
  size_t n = 1;
  for (auto d : a.shape) n *= static_cast<size_t>(d);
  a.data.resize(n);
  if (item == 4) {
    f.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(n * 4));
  } else {
    std::vector<double> tmp(n);
    f.read(reinterpret_cast<char*>(tmp.data()), static_cast<std::streamsize>(n * 8));
    for (size_t i = 0; i < n; ++i) a.data[i] = static_cast<float>(tmp[i]);
  }
  if (!f) throw std::runtime_error(path + ": truncated .npy data");
  return a;
}

// Grid of N images (N, C, H, W): C == 3 -> binary PPM (RGB); otherwise binary PGM with the C channels
// of each image side by side. Values map linearly from [lo, hi] to [0, 255]; lo == hi -> the
// array's own min/max.
inline void write_grid(const std::string& path, const float* data, int64_t n, int64_t c, int64_t h, int64_t w,
                       float lo, float hi, int64_t ncol = 0) {
  if (n <= 0) throw std::runtime_error("no images for the grid");
  size_t total = static_cast<size_t>(n * c * h * w);
  if (!(lo < hi)) {
    lo = INFINITY;
    hi = -INFINITY;
    for (size_t i = 0; i < total; ++i) {
      if (std::isfinite(data[i])) {
        lo = std::min(lo, data[i]);
        hi = std::max(hi, data[i]);
      }
    }
    if (!(lo < hi)) { lo = 0.f; hi = 1.f; }
  }
  const bool rgb = (c == 3);
  const int64_t tile_w = rgb ? w : w * c;
  if (ncol <= 0) ncol = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(n))));
  const int64_t nrow = (n + ncol - 1) / ncol;
  const int64_t pad = 1;
  const int64_t W = ncol * (tile_w + pad) + pad, H = nrow * (h + pad) + pad;
  const int64_t ch = rgb ? 3 : 1;
  std::vector<unsigned char> img(static_cast<size_t>(W * H * ch), 0);
  auto to8 = [&](float v) -> unsigned char {
    if (!std::isfinite(v)) return 0;
    float u = (v - lo) / (hi - lo) * 255.f;
    u = std::min(255.f, std::max(0.f, u));
    return static_cast<unsigned char>(std::lround(u));
  };
  for (int64_t k = 0; k < n; ++k) {
    int64_t r = k / ncol, col = k % ncol;
    int64_t oy = pad + r * (h + pad), ox = pad + col * (tile_w + pad);
    const float* im = data + k * c * h * w;
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < tile_w; ++x) {
        if (rgb) {
          for (int64_t q = 0; q < 3; ++q) img[((oy + y) * W + ox + x) * 3 + q] = to8(im[(q * h + y) * w + x]);
        } else {
          int64_t q = x / w, xx = x % w;
          img[(oy + y) * W + ox + x] = to8(im[(q * h + y) * w + xx]);
        }
      }
  }
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path + " for writing");
  f << (rgb ? "P6\n" : "P5\n") << W << " " << H << "\n255\n";
  f.write(reinterpret_cast<const char*>(img.data()), static_cast<std::streamsize>(img.size()));
  if (!f) throw std::runtime_error("write to " + path + " failed");
}

}  // namespace erw
