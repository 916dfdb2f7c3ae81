// A small strict JSON reader (objects, arrays, strings with \u escapes, numbers,
// true/false/null). Integers that fit int64 keep full precision (ids do not
// survive a round trip through double). Throws JsonError with a column number.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace rocketrec {

struct JsonError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Json {
  enum class Type { Null, Bool, Int, Double, String, Array, Object };
  Type type = Type::Null;
  bool b = false;
  int64_t i = 0;
  double d = 0.0;
  std::string s;
  std::vector<Json> arr;
  std::vector<std::pair<std::string, Json>> obj;  // keeps order; duplicates rejected

  bool is_number() const { return type == Type::Int || type == Type::Double; }
  double number() const { return type == Type::Int ? static_cast<double>(i) : d; }
  const char* type_name() const {
    switch (type) {
      case Type::Null: return "null";
      case Type::Bool: return "bool";
      case Type::Int: return "integer";
      case Type::Double: return "number";
      case Type::String: return "string";
      case Type::Array: return "array";
      default: return "object";
    }
  }
  const Json* get(const std::string& key) const {
    for (const auto& kv : obj)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : t_(text) {}
  Json parse() {
    Json v = value();
    ws();
    if (p_ != t_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& t_;
  size_t p_ = 0;

  [[noreturn]] void fail(const std::string& msg) const {
    throw JsonError("bad JSON: " + msg + " (column " + std::to_string(p_ + 1) + ")");
  }
  void ws() {
    while (p_ < t_.size() && (t_[p_] == ' ' || t_[p_] == '\t' || t_[p_] == '\r' || t_[p_] == '\n')) ++p_;
  }
  char peek() {
    ws();
    if (p_ >= t_.size()) fail("unexpected end of input");
    return t_[p_];
  }
  void expect(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (t_.compare(p_, n, word) != 0) fail(std::string("expected '") + word + "'");
    p_ += n;
  }
  Json value() {
    char c = peek();
    Json v;
    if (c == '{') return object();
    if (c == '[') return array();
    if (c == '"') { v.type = Json::Type::String; v.s = str(); return v; }
    if (c == 't') { expect("true"); v.type = Json::Type::Bool; v.b = true; return v; }
    if (c == 'f') { expect("false"); v.type = Json::Type::Bool; v.b = false; return v; }
    if (c == 'n') { expect("null"); return v; }
    if (c == '-' || (c >= '0' && c <= '9')) return number();
    fail(std::string("unexpected character '") + c + "'");
  }
  Json object() {
    Json v;
    v.type = Json::Type::Object;
    ++p_;
    if (peek() == '}') { ++p_; return v; }
    while (true) {
      if (peek() != '"') fail("expected a string key");
      std::string k = str();
      if (v.get(k)) fail("duplicate key '" + k + "'");
      if (peek() != ':') fail("expected ':'");
      ++p_;
      v.obj.emplace_back(k, value());
      char c = peek();
      ++p_;
      if (c == '}') return v;
      if (c != ',') { --p_; fail("expected ',' or '}'"); }
    }
  }
  Json array() {
    Json v;
    v.type = Json::Type::Array;
    ++p_;
    if (peek() == ']') { ++p_; return v; }
    while (true) {
      v.arr.push_back(value());
      char c = peek();
      ++p_;
      if (c == ']') return v;
      if (c != ',') { --p_; fail("expected ',' or ']'"); }
    }
  }
  static void utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) out += static_cast<char>(cp);
    else if (cp < 0x800) { out += static_cast<char>(0xC0 | (cp >> 6)); out += static_cast<char>(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  uint32_t hex4() {
    if (p_ + 4 > t_.size()) fail("short \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = t_[p_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("bad \\u escape");
    }
    return v;
  }
  std::string str() {
    ++p_;  // opening quote
    std::string out;
    while (true) {
      if (p_ >= t_.size()) fail("unterminated string");
      char c = t_[p_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') { out += c; continue; }
      if (p_ >= t_.size()) fail("unterminated escape");
      char e = t_[p_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00) {  // surrogate pair
            if (t_.compare(p_, 2, "\\u") != 0) fail("lone surrogate");
            p_ += 2;
            uint32_t lo = hex4();
            if (lo < 0xDC00 || lo >= 0xE000) fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          utf8(out, cp);
          break;
        }
        default: fail(std::string("bad escape '\\") + e + "'");
      }
    }
  }
  Json number() {
    size_t start = p_;
    if (t_[p_] == '-') ++p_;
    if (p_ >= t_.size() || !isdigit(static_cast<unsigned char>(t_[p_]))) fail("bad number");
    while (p_ < t_.size() && isdigit(static_cast<unsigned char>(t_[p_]))) ++p_;
    bool integer = true;
    if (p_ < t_.size() && t_[p_] == '.') {
      integer = false;
      ++p_;
      if (p_ >= t_.size() || !isdigit(static_cast<unsigned char>(t_[p_]))) fail("bad number");
      while (p_ < t_.size() && isdigit(static_cast<unsigned char>(t_[p_]))) ++p_;
    }
    if (p_ < t_.size() && (t_[p_] == 'e' || t_[p_] == 'E')) {
      integer = false;
      ++p_;
      if (p_ < t_.size() && (t_[p_] == '+' || t_[p_] == '-')) ++p_;
      if (p_ >= t_.size() || !isdigit(static_cast<unsigned char>(t_[p_]))) fail("bad number");
      while (p_ < t_.size() && isdigit(static_cast<unsigned char>(t_[p_]))) ++p_;
    }
    std::string tok = t_.substr(start, p_ - start);
    Json v;
    if (integer) {
      errno = 0;
      char* end = nullptr;
      long long x = std::strtoll(tok.c_str(), &end, 10);
      if (errno == ERANGE) {
        v.type = Json::Type::Double;  // out of int64: keep as a number, ids will reject it
        v.d = std::strtod(tok.c_str(), nullptr);
        return v;
      }
      v.type = Json::Type::Int;
      v.i = static_cast<int64_t>(x);
      return v;
    }
    v.type = Json::Type::Double;
    v.d = std::strtod(tok.c_str(), nullptr);
    return v;
  }
};

inline Json parse_json(const std::string& text) { return JsonParser(text).parse(); }

}  // namespace rocketrec
