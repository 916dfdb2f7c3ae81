#include "request.h"

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <unordered_set>

#include "rocketrec_hash.h"

namespace rocketrec {

using nlohmann::json;

namespace {

// Nesting depth of [ and { outside strings, stopping early past `limit`: checked before
// parsing so that no input can drive the parser (or a destructor) arbitrarily deep.
int nesting_depth(const std::string& s, int limit) {
  int depth = 0, worst = 0;
  bool in_string = false, escaped = false;
  for (char c : s) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if (c == '[' || c == '{') {
      if (++depth > worst) worst = depth;
      if (worst > limit) return worst;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return worst;
}

std::string short_what(const std::exception& e) {
  // "[json.exception.parse_error.101] parse error at line 1, column 6: syntax error ..."
  std::string m = e.what();
  auto p = m.find("] ");
  if (m.rfind("[json.exception.", 0) == 0 && p != std::string::npos) m = m.substr(p + 2);
  if (m.size() > 300) m = m.substr(0, 300) + "...";
  return m;
}

json parse_json(const std::string& line, const Limits& limits) {
  if (line.size() > limits.max_line_bytes)
    throw RequestError("line longer than " + std::to_string(limits.max_line_bytes) + " bytes");
  if (nesting_depth(line, limits.max_depth) > limits.max_depth)
    throw RequestError("bad JSON: nesting deeper than " + std::to_string(limits.max_depth));
  std::vector<std::unordered_set<std::string>> keys;  // per open object
  std::string duplicate;
  json::parser_callback_t cb = [&](int, json::parse_event_t ev, json& parsed) {
    if (ev == json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (ev == json::parse_event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (ev == json::parse_event_t::key && !keys.empty() && parsed.is_string()) {
      if (!keys.back().insert(parsed.get_ref<const std::string&>()).second && duplicate.empty())
        duplicate = parsed.get<std::string>();
    }
    return true;
  };
  json j;
  try {
    j = json::parse(line, cb);
  } catch (const json::exception& e) {
    throw RequestError("bad JSON: " + short_what(e));
  }
  if (!duplicate.empty()) throw RequestError("duplicate key '" + duplicate + "'");
  return j;
}

const char* type_name(const json& v) {
  if (v.is_number_float()) return "float";
  return v.type_name();
}

std::string preview(const json& v) {
  std::string s = v.dump(-1, ' ', true, json::error_handler_t::replace);
  return s.size() > 40 ? s.substr(0, 40) + "..." : s;
}

// Error messages quote parts of the input: keep them valid UTF-8 and printable (invalid
// bytes and control characters become \xNN), so one error is always one clean line.
std::string clean_utf8(const std::string& s) {
  std::string out;
  static const char* hex = "0123456789abcdef";
  auto esc = [&](unsigned char c) {
    out += "\\x";
    out += hex[c >> 4];
    out += hex[c & 15];
  };
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    bool ok = n > 0 && i + n <= s.size();
    for (size_t k = 1; ok && k < n; ++k) ok = (static_cast<unsigned char>(s[i + k]) >> 6) == 2;
    if (!ok || (n == 1 && (c < 0x20 || c == 0x7f))) {
      esc(c);
      ++i;
    } else {
      out.append(s, i, n);
      i += n;
    }
  }
  return out;
}

}  // namespace

RequestParser::RequestParser(std::vector<SparseFeatureInfo> sparse, std::vector<DenseFeatureInfo> dense,
                             Limits limits)
    : sparse_(std::move(sparse)), dense_(std::move(dense)), limits_(limits) {
  for (size_t i = 0; i < sparse_.size(); ++i) index_[sparse_[i].name] = static_cast<long>(i);
  for (size_t i = 0; i < dense_.size(); ++i) index_[dense_[i].name] = -static_cast<long>(i) - 1;
}

RequestParser RequestParser::from_manifest(const std::string& text, Limits limits) {
  json m;
  try {
    m = json::parse(text);
  } catch (const json::exception& e) {
    throw std::runtime_error("manifest.json: " + short_what(e));
  }
  try {
    if (!m.is_object() || !m.contains("format") || !m["format"].is_string() ||
        m["format"].get<std::string>().rfind("rocketrec-light/", 0) != 0)
      throw std::runtime_error("manifest format is not rocketrec-light/*");
    if (!manifest_format_readable(m["format"].get<std::string>()))
      throw std::runtime_error("manifest format '" + m["format"].get<std::string>() +
                               "' is not one this predictor reads (" + kManifestFormatsRead +
                               "); export the model again, or build the predictor of its rocketrec version");
    if (!m.contains("sparse_features") || !m["sparse_features"].is_array() || !m.contains("dense_features") ||
        !m["dense_features"].is_array())
      throw std::runtime_error("manifest lacks sparse_features/dense_features");
    std::vector<SparseFeatureInfo> sparse;
    std::vector<DenseFeatureInfo> dense;
    for (const auto& f : m["sparse_features"]) {
      if (!f.contains("name") || !f["name"].is_string())
        throw std::runtime_error("manifest sparse feature without a name");
      SparseFeatureInfo info;
      info.name = f["name"].get<std::string>();
      info.is_string = f.contains("dtype") && f["dtype"] == "string";
      // a sequence the light tower reads is a list of ids, newest first (a mean-pooled bag)
      info.is_list = f.contains("kind") && (f["kind"] == "list" || f["kind"] == "sequence");
      if (f.contains("max_ids") && f["max_ids"].is_number_integer()) info.max_ids = f["max_ids"].get<int64_t>();
      sparse.push_back(std::move(info));
    }
    for (const auto& f : m["dense_features"]) {
      if (!f.contains("name") || !f["name"].is_string())
        throw std::runtime_error("manifest dense feature without a name");
      dense.push_back({f["name"].get<std::string>()});
    }
    // The hashes must be the ones this program implements: check the manifest's vectors.
    if (!m.contains("hash") || !m["hash"].contains("test_vectors"))
      throw std::runtime_error("manifest lacks hash test vectors");
    for (const auto& tv : m["hash"]["test_vectors"]) {
      const std::string s = tv.at(0).get<std::string>();
      if (fnv1a64(s) != tv.at(1).get<int64_t>())
        throw std::runtime_error("manifest hash test vector mismatch for '" + s + "'");
    }
    if (m.contains("cross_hash")) {
      for (const auto& tv : m["cross_hash"]["test_vectors"]) {
        std::vector<int64_t> ids = tv.at(0).get<std::vector<int64_t>>();
        if (cross_hash(ids.data(), ids.size()) != tv.at(1).get<int64_t>())
          throw std::runtime_error("manifest cross_hash test vector mismatch");
      }
    }
    return RequestParser(std::move(sparse), std::move(dense), limits);
  } catch (const json::exception& e) {
    throw std::runtime_error("manifest.json: " + short_what(e));
  }
}

void RequestParser::check_shape(const Request& r, const std::string& what) const {
  if (r.bags.size() != sparse_.size())
    throw RequestError(what + " has " + std::to_string(r.bags.size()) + " bags; the model reads " +
                       std::to_string(sparse_.size()) + " sparse inputs");
  if (r.dense.size() != dense_.size())
    throw RequestError(what + " has " + std::to_string(r.dense.size()) + " dense values; the model reads " +
                       std::to_string(dense_.size()));
}

void RequestParser::check_disjoint(const Request& context, const std::vector<Request>& candidates) const {
  std::vector<size_t> bags, dense;  // what the context gives: only those can overlap
  for (size_t i = 0; i < sparse_.size(); ++i)
    if (!context.bags[i].empty()) bags.push_back(i);
  for (size_t i = 0; i < dense_.size(); ++i)
    if (!std::isnan(context.dense[i])) dense.push_back(i);
  for (size_t j = 0; j < candidates.size(); ++j) {
    const Request& r = candidates[j];
    for (size_t i : bags)
      if (!r.bags[i].empty())
        throw RequestError("feature '" + sparse_[i].name + "' is given in the context and in candidate " +
                           std::to_string(j));
    for (size_t i : dense)
      if (!std::isnan(r.dense[i]))
        throw RequestError("feature '" + dense_[i].name + "' is given in the context and in candidate " +
                           std::to_string(j));
  }
}

namespace {

struct RowBuilder {
  const RequestParser& p;
  const std::vector<SparseFeatureInfo>& sparse;
  const std::vector<DenseFeatureInfo>& dense;
  const std::unordered_map<std::string, long>& index;
  std::string where;  // "" or "context: " / "candidate 3: "

  void add_ids(size_t i, const json& v, std::vector<int64_t>& bag) const {
    const SparseFeatureInfo& f = sparse[i];
    auto one = [&](const json& x) {
      if (f.is_string) {
        if (!x.is_string())
          throw RequestError(where + "feature '" + f.name + "' expects string ids, got " + type_name(x) + " " +
                             preview(x));
        bag.push_back(fnv1a64(x.get_ref<const std::string&>()));
      } else if (x.is_number_unsigned()) {
        const uint64_t u = x.get<uint64_t>();
        if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
          throw RequestError(where + "feature '" + f.name + "': id " + std::to_string(u) + " does not fit int64");
        bag.push_back(static_cast<int64_t>(u));
      } else if (x.is_number_integer()) {
        bag.push_back(x.get<int64_t>());
      } else {
        throw RequestError(where + "feature '" + f.name + "' expects int64 ids, got " + type_name(x) + " " +
                           preview(x));
      }
      if (bag.size() > p.limits().max_ids_per_bag)
        throw RequestError(where + "feature '" + f.name + "': more than " +
                           std::to_string(p.limits().max_ids_per_bag) + " ids");
    };
    if (v.is_null()) return;
    if (v.is_array()) {
      for (const auto& x : v)
        if (!x.is_null()) one(x);  // a null list element is no id (as in training data)
    } else {
      one(v);
    }
  }

  float number(const std::string& name, const json& v) const {
    if (v.is_null()) return std::numeric_limits<float>::quiet_NaN();  // missing
    if (!v.is_number())
      throw RequestError(where + "dense feature '" + name + "' expects a number, got " + type_name(v) + " " +
                         preview(v));
    const float x = static_cast<float>(v.get<double>());
    if (!std::isfinite(x))
      throw RequestError(where + "dense feature '" + name + "': " + preview(v) + " is not a finite float32");
    return x;
  }

  Request build(const json& obj) const {
    if (!obj.is_object()) throw RequestError(where + "a request must be a JSON object");
    Request r;
    r.bags.resize(sparse.size());
    r.dense.assign(dense.size(), std::numeric_limits<float>::quiet_NaN());
    const json* named = &obj;
    static const json empty_object = json::object();
    auto sp = obj.find("sparse");
    auto dv = obj.find("dense");
    bool positional = false;  // the numbers were given by position ('dense')
    if (sp != obj.end() || (dv != obj.end() && dv->is_array())) {
      for (auto it = obj.begin(); it != obj.end(); ++it)
        if (it.key() != "sparse" && it.key() != "dense")
          throw RequestError(where + "unexpected key '" + it.key() + "' beside 'sparse'/'dense'");
      if (dv != obj.end() && !dv->is_null()) {
        if (!dv->is_array() || dv->size() != dense.size())
          throw RequestError(where + "'dense' must be a list of " + std::to_string(dense.size()) + " numbers, got " +
                             (dv->is_array() ? std::to_string(dv->size()) : std::string(type_name(*dv))));
        for (size_t i = 0; i < dense.size(); ++i) r.dense[i] = number(dense[i].name, (*dv)[i]);
        positional = true;
      }
      named = sp != obj.end() ? &*sp : &empty_object;
      if (!named->is_object()) throw RequestError(where + "'sparse' must be an object");
    }
    for (auto it = named->begin(); it != named->end(); ++it) {
      auto f = index.find(it.key());
      if (f == index.end()) {  // as Python: name what the model reads
        std::string names;
        for (const auto& x : sparse) names += (names.empty() ? "" : ", ") + x.name;
        for (const auto& x : dense) names += (names.empty() ? "" : ", ") + x.name;
        throw RequestError(where + "unknown feature '" + it.key() + "' (the model reads: " + names + ")");
      }
      if (f->second >= 0) {
        add_ids(static_cast<size_t>(f->second), it.value(), r.bags[static_cast<size_t>(f->second)]);
      } else {
        const size_t i = static_cast<size_t>(-f->second - 1);
        if (positional)  // one value would silently win over the other
          throw RequestError(where + "'" + it.key() + "' is given in 'sparse' and in 'dense': give it once");
        r.dense[i] = number(dense[i].name, it.value());
      }
    }
    return r;
  }
};

}  // namespace

ParsedLine RequestParser::parse(const std::string& line) const {
  try {
    return parse_unchecked(line);
  } catch (const RequestError& e) {
    throw RequestError(clean_utf8(e.what()));
  }
}

ParsedLine RequestParser::parse_unchecked(const std::string& line) const {
  const json obj = parse_json(line, limits_);
  ParsedLine out;
  if (obj.is_object() && (obj.contains("context") || obj.contains("candidates"))) {
    for (auto it = obj.begin(); it != obj.end(); ++it)
      if (it.key() != "context" && it.key() != "candidates")
        throw RequestError("unexpected key '" + it.key() + "' beside 'context'/'candidates'");
    auto c = obj.find("candidates");
    if (c == obj.end() || !c->is_array() || c->empty())
      throw RequestError("'candidates' must be a non-empty list of requests");
    if (c->size() > limits_.max_candidates)
      throw RequestError("more than " + std::to_string(limits_.max_candidates) + " candidates");
    out.has_candidates = true;
    auto ctx = obj.find("context");
    static const json empty_object = json::object();
    out.candidates.context =
        RowBuilder{*this, sparse_, dense_, index_, "context: "}.build(ctx != obj.end() ? *ctx : empty_object);
    out.candidates.candidates.reserve(c->size());
    for (size_t j = 0; j < c->size(); ++j)
      out.candidates.candidates.push_back(
          RowBuilder{*this, sparse_, dense_, index_, "candidate " + std::to_string(j) + ": "}.build((*c)[j]));
    check_disjoint(out.candidates.context, out.candidates.candidates);  // shapes right by construction
    return out;
  }
  out.row = RowBuilder{*this, sparse_, dense_, index_, ""}.build(obj);
  return out;
}

Request RequestParser::parse_request(const std::string& line) const {
  ParsedLine p = parse(line);
  if (p.has_candidates) throw RequestError("a context+candidates request where one row was expected");
  return std::move(p.row);
}

}  // namespace rocketrec
