// parse_check: the request parser alone (no libtorch), for fuzzing under sanitizers.
//
//   parse_check MANIFEST.json < lines      one output line per input line:
//       "ok rows=N" (N rows: 1, or the number of candidates) or "error: ..."
//
// Built by CMake with -DROCKETREC_SANITIZE=ON as -fsanitize=address,undefined; the tests
// feed it random and mutated request lines and fail on any crash or sanitizer report.
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "request.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: parse_check MANIFEST.json < REQUESTS.jsonl\n";
    return 2;
  }
  std::ifstream f(argv[1]);
  if (!f) {
    std::cerr << "parse_check: error: " << argv[1] << ": cannot open\n";
    return 2;
  }
  std::stringstream ss;
  ss << f.rdbuf();
  rocketrec::RequestParser parser;
  try {
    parser = rocketrec::RequestParser::from_manifest(ss.str());
  } catch (const std::exception& e) {
    std::cerr << "parse_check: error: " << argv[1] << ": " << e.what() << "\n";
    return 2;
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    try {
      rocketrec::ParsedLine p = parser.parse(line);
      if (p.has_candidates) {
        for (const auto& c : p.candidates.candidates) parser.check_shape(c, "candidate");
        std::cout << "ok rows=" << p.candidates.candidates.size() << "\n";
      } else {
        parser.check_shape(p.row, "request");
        std::cout << "ok rows=1\n";
      }
    } catch (const rocketrec::RequestError& e) {
      std::string msg = e.what();
      for (char& c : msg)
        if (c == '\n') c = ' ';
      std::cout << "error: " << msg << "\n";
    }
  }
  return 0;
}
