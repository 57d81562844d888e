/*
 * Copyright EdgeLoop developers. Licensed under the Apache License, Version 2.0.
 *
 * edgeloop-armv7-runner: run a compiled TVM (Relax VM) artifact on saved inputs, without Python.
 *
 * This is the C++ twin of compiler/runner_main.py and implements the same runner protocol:
 *
 *   edgeloop-armv7-runner WORKDIR
 *
 *   WORKDIR/request.json  {"lib": "<path to .so>", "num_samples": K, "num_inputs": I,
 *                          "warmup": W, "repeat": R}            (optional: "entry", default "main")
 *   WORKDIR/s{k}_in{i}.npy   input i of sample k (NumPy .npy, C order; float32, float16, float64,
 *                            int8, uint8, int32, int64, bool)
 *
 * For every sample it calls the VM entry and writes each output j (tuples flattened in order) as
 * WORKDIR/s{k}_out{j}.npy; then it times R calls on sample 0 after W warm-up calls and writes
 *
 *   WORKDIR/result.json   {"num_outputs": J, "latency_ms": [...], "machine": "<uname -m>",
 *                          "runtime": "tvm <version> (edgeloop armv7 runner)"}
 *
 * Exit status: 0 ok, 1 any error (message on stderr), 2 usage.
 */
#include <sys/utsname.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>
#include <tvm/runtime/base.h>
#include <tvm/runtime/tensor.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

namespace ffi = tvm::ffi;
using tvm::runtime::Tensor;

/*! \brief An error in the runner's own input (request, .npy files): reported without a traceback. */
class RunnerError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw RunnerError("cannot open '" + path + "': " + std::strerror(errno));
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw RunnerError("cannot write '" + path + "': " + std::strerror(errno));
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  if (!out) throw RunnerError("short write to '" + path + "'");
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

// ---------------------------------------------------------------------------------------------
// request.json
// ---------------------------------------------------------------------------------------------

struct Request {
  std::string lib;
  std::string entry = "main";
  int64_t num_samples = 0;
  int64_t num_inputs = 0;
  int64_t warmup = 1;
  int64_t repeat = 0;
};

int64_t GetInt(const ffi::Map<ffi::Any, ffi::Any>& obj, const char* key, bool required,
               int64_t fallback) {
  auto it = obj.find(ffi::String(key));
  if (it == obj.end()) {
    if (required) throw RunnerError(std::string("request.json: missing key '") + key + "'");
    return fallback;
  }
  if (auto v = (*it).second.try_cast<int64_t>()) {
    if (*v < 0) throw RunnerError(std::string("request.json: '") + key + "' must be >= 0");
    return *v;
  }
  throw RunnerError(std::string("request.json: '") + key + "' must be an integer");
}

std::string GetString(const ffi::Map<ffi::Any, ffi::Any>& obj, const char* key, bool required,
                      const std::string& fallback) {
  auto it = obj.find(ffi::String(key));
  if (it == obj.end()) {
    if (required) throw RunnerError(std::string("request.json: missing key '") + key + "'");
    return fallback;
  }
  if (auto v = (*it).second.try_cast<ffi::String>()) return std::string(*v);
  throw RunnerError(std::string("request.json: '") + key + "' must be a string");
}

Request ParseRequest(const std::string& path) {
  std::string text = ReadFile(path);
  ffi::String err;
  ffi::json::Value value = ffi::json::Parse(text, &err);
  if (!err.empty()) throw RunnerError("request.json: invalid JSON: " + std::string(err));
  auto obj = value.try_cast<ffi::Map<ffi::Any, ffi::Any>>();
  if (!obj) throw RunnerError("request.json: expected a JSON object");
  Request req;
  req.lib = GetString(*obj, "lib", true, "");
  req.entry = GetString(*obj, "entry", false, "main");
  req.num_samples = GetInt(*obj, "num_samples", true, 0);
  req.num_inputs = GetInt(*obj, "num_inputs", true, 0);
  req.warmup = GetInt(*obj, "warmup", false, 1);
  req.repeat = GetInt(*obj, "repeat", false, 0);
  return req;
}

// ---------------------------------------------------------------------------------------------
// NumPy .npy (format versions 1.0, 2.0, 3.0; little-endian or byte-order-free dtypes; C order)
// ---------------------------------------------------------------------------------------------

struct NpyType {
  const char* descr;
  DLDataType dtype;
};

const NpyType kNpyTypes[] = {
    {"<f4", {kDLFloat, 32, 1}}, {"<f2", {kDLFloat, 16, 1}}, {"<f8", {kDLFloat, 64, 1}},
    {"|i1", {kDLInt, 8, 1}},    {"|u1", {kDLUInt, 8, 1}},   {"<i2", {kDLInt, 16, 1}},
    {"<u2", {kDLUInt, 16, 1}},  {"<i4", {kDLInt, 32, 1}},   {"<u4", {kDLUInt, 32, 1}},
    {"<i8", {kDLInt, 64, 1}},   {"<u8", {kDLUInt, 64, 1}},  {"|b1", {kDLBool, 8, 1}},
};

std::string SupportedDescrs() {
  std::string out;
  for (const auto& t : kNpyTypes) out += (out.empty() ? "" : ", ") + std::string(t.descr);
  return out;
}

DLDataType DescrToDType(const std::string& descr, const std::string& path) {
  std::string d = descr;
  // NumPy writes '|' for one-byte types and '<' for little-endian; accept '=' too (native = LE).
  if (!d.empty() && d[0] == '=') d[0] = '<';
  for (const auto& t : kNpyTypes) {
    if (d == t.descr) return t.dtype;
    // one-byte types are sometimes spelled with '<'
    if (t.descr[0] == '|' && d.size() == 3 && d[0] == '<' && d.substr(1) == t.descr + 1)
      return t.dtype;
  }
  throw RunnerError(path + ": unsupported dtype '" + descr + "'; supported: " + SupportedDescrs());
}

std::string DTypeToDescr(DLDataType dtype) {
  for (const auto& t : kNpyTypes) {
    if (t.dtype.code == dtype.code && t.dtype.bits == dtype.bits && dtype.lanes == 1)
      return t.descr;
  }
  throw RunnerError("cannot save an output of dtype '" +
                    std::string(ffi::DLDataTypeToString(dtype)) + "' as .npy");
}

// Returns the text of `'key': <value>` from a .npy header dict, value up to the next ',' or '}'
// at depth 0 (parentheses and quotes respected).
std::string HeaderField(const std::string& header, const std::string& key,
                        const std::string& path) {
  size_t pos = header.find("'" + key + "'");
  if (pos == std::string::npos) throw RunnerError(path + ": .npy header lacks '" + key + "'");
  pos = header.find(':', pos);
  if (pos == std::string::npos) throw RunnerError(path + ": malformed .npy header");
  ++pos;
  while (pos < header.size() && header[pos] == ' ') ++pos;
  size_t end = pos;
  int depth = 0;
  char quote = 0;
  for (; end < header.size(); ++end) {
    char c = header[end];
    if (quote) {
      if (c == quote) quote = 0;
    } else if (c == '\'' || c == '"') {
      quote = c;
    } else if (c == '(') {
      ++depth;
    } else if (c == ')') {
      --depth;
    } else if ((c == ',' || c == '}') && depth == 0) {
      break;
    }
  }
  std::string value = header.substr(pos, end - pos);
  while (!value.empty() && value.back() == ' ') value.pop_back();
  return value;
}

Tensor LoadNpy(const std::string& path, DLDevice dev) {
  std::string data = ReadFile(path);
  static const char kMagic[] = "\x93NUMPY";
  if (data.size() < 10 || data.compare(0, 6, kMagic, 6) != 0)
    throw RunnerError(path + ": not a .npy file");
  uint8_t major = static_cast<uint8_t>(data[6]);
  size_t header_len = 0, header_start = 0;
  if (major == 1) {
    header_len = static_cast<uint8_t>(data[8]) | (static_cast<uint8_t>(data[9]) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (data.size() < 12) throw RunnerError(path + ": truncated .npy header");
    header_len = 0;
    for (int b = 3; b >= 0; --b) header_len = (header_len << 8) | static_cast<uint8_t>(data[8 + b]);
    header_start = 12;
  } else {
    throw RunnerError(path + ": unsupported .npy format version " + std::to_string(major));
  }
  if (data.size() < header_start + header_len) throw RunnerError(path + ": truncated .npy header");
  std::string header = data.substr(header_start, header_len);

  std::string descr = HeaderField(header, "descr", path);
  if (descr.size() < 2 || (descr.front() != '\'' && descr.front() != '"'))
    throw RunnerError(path + ": unsupported descr " + descr + " (structured dtypes are not supported)");
  descr = descr.substr(1, descr.size() - 2);
  DLDataType dtype = DescrToDType(descr, path);
  if (HeaderField(header, "fortran_order", path) != "False")
    throw RunnerError(path + ": Fortran-order arrays are not supported; save with C order");

  std::string shape_text = HeaderField(header, "shape", path);
  if (shape_text.size() < 2 || shape_text.front() != '(' || shape_text.back() != ')')
    throw RunnerError(path + ": malformed shape " + shape_text);
  std::vector<int64_t> shape;
  std::string inner = shape_text.substr(1, shape_text.size() - 2);
  std::stringstream ss(inner);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t b = item.find_first_not_of(' ');
    if (b == std::string::npos) continue;  // trailing comma of a 1-tuple
    try {
      shape.push_back(std::stoll(item.substr(b)));
    } catch (const std::exception&) {
      throw RunnerError(path + ": malformed shape " + shape_text);
    }
  }

  Tensor tensor = Tensor::Empty(ffi::Shape(shape.begin(), shape.end()), dtype, dev);
  size_t nbytes = ffi::GetDataSize(*tensor.GetDLTensorPtr());
  size_t payload = header_start + header_len;
  if (data.size() - payload != nbytes) {
    throw RunnerError(path + ": expected " + std::to_string(nbytes) + " data bytes for shape " +
                      shape_text + " and dtype " + descr + ", found " +
                      std::to_string(data.size() - payload));
  }
  tensor.CopyFromBytes(data.data() + payload, nbytes);
  return tensor;
}

void SaveNpy(const std::string& path, DLDataType dtype, const std::vector<int64_t>& shape,
             const void* bytes, size_t nbytes) {
  std::string dict = "{'descr': '" + DTypeToDescr(dtype) + "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i) {
    dict += std::to_string(shape[i]);
    if (shape.size() == 1 || i + 1 < shape.size()) dict += ",";
    if (i + 1 < shape.size()) dict += " ";
  }
  dict += "), }";
  // Pad with spaces so that magic(6) + version(2) + len(2) + header is a multiple of 64, '\n' last.
  size_t total = 10 + dict.size() + 1;
  dict.append((64 - total % 64) % 64, ' ');
  dict += '\n';
  std::string out("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(dict.size() & 0xFF);
  out += static_cast<char>((dict.size() >> 8) & 0xFF);
  out += dict;
  out.append(static_cast<const char*>(bytes), nbytes);
  WriteFile(path, out);
}

// ---------------------------------------------------------------------------------------------
// Outputs: flatten tensors / tuples / shapes / scalars like runner_main.py's _flatten
// ---------------------------------------------------------------------------------------------

struct HostArray {
  DLDataType dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

void Flatten(const ffi::Any& value, std::vector<HostArray>* out) {
  if (auto tensor = value.try_cast<ffi::Tensor>()) {
    const DLTensor* t = tensor->GetDLTensorPtr();
    HostArray arr;
    arr.dtype = t->dtype;
    arr.shape.assign(t->shape, t->shape + t->ndim);
    size_t nbytes = ffi::GetDataSize(*t);
    arr.bytes.resize(nbytes);
    if (nbytes != 0) Tensor::CopyToBytes(t, &arr.bytes[0], nbytes);
    out->push_back(std::move(arr));
    return;
  }
  if (auto shape = value.try_cast<ffi::Shape>()) {
    HostArray arr;
    arr.dtype = {kDLInt, 64, 1};
    arr.shape = {static_cast<int64_t>(shape->size())};
    arr.bytes.assign(reinterpret_cast<const char*>(shape->data()), shape->size() * sizeof(int64_t));
    out->push_back(std::move(arr));
    return;
  }
  if (auto items = value.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *items) Flatten(item, out);
    return;
  }
  HostArray arr;
  if (value.type_index() == ffi::TypeIndex::kTVMFFIBool) {
    bool v = value.cast<bool>();
    arr.dtype = {kDLBool, 8, 1};
    arr.bytes.assign(1, static_cast<char>(v ? 1 : 0));
  } else if (value.type_index() == ffi::TypeIndex::kTVMFFIInt) {
    int64_t v = value.cast<int64_t>();
    arr.dtype = {kDLInt, 64, 1};
    arr.bytes.assign(reinterpret_cast<const char*>(&v), sizeof(v));
  } else if (value.type_index() == ffi::TypeIndex::kTVMFFIFloat) {
    double v = value.cast<double>();
    arr.dtype = {kDLFloat, 64, 1};
    arr.bytes.assign(reinterpret_cast<const char*>(&v), sizeof(v));
  } else {
    throw RunnerError("unsupported output of type '" + std::string(value.GetTypeKey()) + "'");
  }
  out->push_back(std::move(arr));
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

std::string Machine() {
  struct utsname u;
  if (uname(&u) != 0) return "unknown";
  return u.machine;
}

int Run(const std::string& workdir) {
  Request req = ParseRequest(JoinPath(workdir, "request.json"));
  DLDevice dev{kDLCPU, 0};

  ffi::Module lib = ffi::Module::LoadFromFile(req.lib);
  auto load_exec = lib->GetFunction("vm_load_executable", /*query_imports=*/true);
  if (!load_exec) throw RunnerError("'" + req.lib + "' is not a Relax VM executable");
  ffi::Module vm = (*load_exec)().cast<ffi::Module>();
  // vm_initialization(device_type, device_id, alloc_type, ...): CPU 0 with the pooled allocator
  // (VirtualMachine.POOLED_ALLOCATOR == 2), as tvm.runtime.vm.VirtualMachine(mod, tvm.cpu()) does.
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
  auto entry = vm->GetFunction(req.entry);
  if (!entry) throw RunnerError("the executable has no function '" + req.entry + "'");

  auto load_inputs = [&](int64_t k) {
    std::vector<ffi::Any> args;
    for (int64_t i = 0; i < req.num_inputs; ++i) {
      std::string name = "s" + std::to_string(k) + "_in" + std::to_string(i) + ".npy";
      args.emplace_back(LoadNpy(JoinPath(workdir, name), dev));
    }
    return args;
  };
  auto call = [&](const std::vector<ffi::Any>& args) {
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any result;
    entry.value().CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
    return result;
  };

  size_t num_outputs = 0;
  for (int64_t k = 0; k < req.num_samples; ++k) {
    std::vector<HostArray> outputs;
    Flatten(call(load_inputs(k)), &outputs);
    num_outputs = outputs.size();
    for (size_t j = 0; j < outputs.size(); ++j) {
      std::string name = "s" + std::to_string(k) + "_out" + std::to_string(j) + ".npy";
      SaveNpy(JoinPath(workdir, name), outputs[j].dtype, outputs[j].shape,
              outputs[j].bytes.data(), outputs[j].bytes.size());
    }
  }

  std::vector<double> latencies;
  if (req.num_samples > 0 && (req.warmup > 0 || req.repeat > 0)) {
    std::vector<ffi::Any> args = load_inputs(0);
    for (int64_t w = 0; w < req.warmup; ++w) call(args);
    for (int64_t r = 0; r < req.repeat; ++r) {
      auto start = std::chrono::steady_clock::now();
      call(args);
      auto stop = std::chrono::steady_clock::now();
      latencies.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
    }
  }

  std::ostringstream json;
  json.precision(17);
  json << "{\"num_outputs\": " << num_outputs << ", \"latency_ms\": [";
  for (size_t i = 0; i < latencies.size(); ++i) json << (i ? ", " : "") << latencies[i];
  json << "], \"machine\": \"" << JsonEscape(Machine()) << "\", \"runtime\": \"tvm "
       << JsonEscape(TVM_VERSION) << " (edgeloop armv7 runner)\"}\n";
  WriteFile(JoinPath(workdir, "result.json"), json.str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s WORKDIR\n", argc > 0 ? argv[0] : "edgeloop-armv7-runner");
    return 2;
  }
  try {
    return Run(argv[1]);
  } catch (const RunnerError& err) {
    std::fprintf(stderr, "edgeloop-armv7-runner: error: %s\n", err.what());
  } catch (const ffi::Error& err) {
    std::fprintf(stderr, "edgeloop-armv7-runner: TVM error: %s: %s\n%s", err.kind().c_str(),
                 err.message().c_str(), err.TracebackMostRecentCallLast().c_str());
  } catch (const std::exception& err) {
    std::fprintf(stderr, "edgeloop-armv7-runner: error: %s\n", err.what());
  }
  return 1;
}
