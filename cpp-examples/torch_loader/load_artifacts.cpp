// Loads every artifact listed in a manifest with torch::jit::load, runs it
// on the recorded inputs and compares with the recorded eager outputs.
//
// Manifest (text, one record per artifact):
//   artifact <blueprint_id> <artifact path>
//   input <raw float32 file> <rank> <dims...>      (one line per input)
//   expected <raw float32 file> <rank> <dims...>
//   end
// Prints "N passed, M failed" and exits non-zero on any failure.
#include <torch/script.h>

#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

torch::Tensor read_tensor(const std::string &path, const std::vector<int64_t> &shape) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  if (static_cast<int64_t>(bytes.size()) != count * 4) throw std::runtime_error(path + ": size does not match shape");
  return torch::from_blob(bytes.data(), shape, torch::kFloat32).clone();
}

std::pair<std::string, std::vector<int64_t>> parse_tensor_line(std::istringstream &line) {
  std::string path;
  size_t rank = 0;
  line >> path >> rank;
  std::vector<int64_t> shape(rank);
  for (auto &d : shape) line >> d;
  return {path, shape};
}

}  // namespace

int main(int argc, char **argv) {
  if (argc != 2) {
    std::cerr << "usage: load_artifacts MANIFEST\n";
    return 2;
  }
  torch::NoGradGuard no_grad;
  std::ifstream manifest(argv[1]);
  std::string raw, id, artifact;
  std::vector<torch::jit::IValue> inputs;
  torch::Tensor expected;
  int passed = 0, failed = 0;
  while (std::getline(manifest, raw)) {
    std::istringstream line(raw);
    std::string kind;
    line >> kind;
    try {
      if (kind == "artifact") {
        line >> id >> artifact;
        inputs.clear();
      } else if (kind == "input") {
        auto [path, shape] = parse_tensor_line(line);
        inputs.emplace_back(read_tensor(path, shape));
      } else if (kind == "expected") {
        auto [path, shape] = parse_tensor_line(line);
        expected = read_tensor(path, shape);
      } else if (kind == "end") {
        torch::jit::Module module = torch::jit::load(artifact);
        module.eval();
        torch::Tensor output = module.forward(inputs).toTensor();
        if (output.sizes() == expected.sizes() && torch::allclose(output, expected, 1e-4, 1e-5)) {
          passed++;
        } else {
          failed++;
          std::cerr << id << ": output differs from the eager reference (" << artifact << ")\n";
        }
      }
    } catch (const std::exception &e) {
      failed++;
      std::cerr << id << ": " << e.what() << "\n";
    }
  }
  std::cout << passed << " passed, " << failed << " failed\n";
  return failed == 0 && passed > 0 ? 0 : 1;
}
