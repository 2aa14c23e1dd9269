// SPDX-License-Identifier: MIT
// The examples' built-in training text: plain English prose ("The Valley Chronicle"), generated on the fly from a
// hand-written grammar and word lists in this file, so it works offline on any machine and is the same everywhere
// (it uses memoryformer::Rng, not <random>). Written for this project and released with it under the MIT license.
//
// It is made to be learnable in minutes but not trivial: a few hundred words, chapters with their own cast and
// places (so names recur within a chapter and attention has something to copy), narration, dialogue, descriptions,
// numbers and lists. Its byte statistics are those of ordinary English (unigram entropy about 4.2 bits per byte).
// `train_lm --write-default-text FILE` writes it out, e.g. to inspect it or to train other tools on the same text.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <memoryformer/random.hpp>

namespace memoryformer_examples {

namespace text_detail {

using Words = std::span<const std::string_view>;

inline constexpr std::string_view first_names[] = {
    "Anna",  "Ben",    "Clara", "Daniel", "Edith",  "Felix",  "Grace", "Henry", "Iris",   "James",
    "Kate",  "Leo",    "Mary",  "Nathan", "Olive",  "Peter",  "Rose",  "Samuel", "Thomas", "Una",
    "Victor", "Walter", "Ada",  "Hugh",   "Martha", "Owen",   "Ruth",  "Simon", "Tess",   "Arthur",
    "Lucy",  "Miles",  "Nora",  "Oscar",  "Paul",   "Wendy",  "Frank", "Alice", "George", "Helen"};
inline constexpr std::string_view family_names[] = {
    "Miller", "Baker", "Thatcher", "Carter", "Fletcher", "Mason", "Cooper", "Turner", "Weaver", "Fisher",
    "Hale",   "Brook", "Marsh",    "Wood",   "Stone",    "Field", "Ward",   "Reed",   "Shaw",   "Lane"};
inline constexpr std::string_view towns[] = {
    "Ashford",  "Millbrook", "Northgate", "Greywater", "Oakhurst",  "Saltmarsh",
    "Kingsbridge", "Elmstead", "Highmoor", "Fernley",  "Westwater", "Stonebury"};
inline constexpr std::string_view places[] = {
    "the mill",    "the bridge",   "the river",   "the market",   "the church", "the harbour",
    "the inn",     "the school",   "the forest",  "the orchard",  "the meadow", "the farm",
    "the station", "the library",  "the old tower", "the hill",   "the garden", "the kitchen",
    "the workshop", "the lighthouse", "the bakery", "the square", "the well",   "the post office",
    "the barn",    "the quarry",   "the lake",    "the valley road", "the chapel", "the schoolhouse"};
inline constexpr std::string_view objects[] = {
    "letter", "basket", "lantern", "key",    "book",   "map",    "coat",    "cart",  "boat",   "bell",
    "candle", "window", "door",    "table",  "chair",  "loaf",   "apple",   "stone", "rope",   "hat",
    "box",    "clock",  "coin",    "cup",    "knife",  "wheel",  "ladder",  "blanket", "kettle", "pen",
    "fence",  "gate",   "bucket",  "shovel", "parcel", "ribbon", "compass", "jar",   "bottle", "scarf",
    "drum",   "violin", "saddle",  "anchor", "net",    "barrel", "painting", "mirror", "shelf", "notebook"};
inline constexpr std::string_view animals[] = {"dog",  "cat",  "horse", "fox",   "crow",  "goose", "sheep",
                                               "cow",  "hare", "owl",   "mouse", "goat",  "pony",  "heron",
                                               "swan", "pig",  "robin", "badger", "donkey", "hen"};
inline constexpr std::string_view adjectives[] = {
    "old",     "small",  "quiet",   "bright",   "cold",     "warm",    "heavy",  "narrow", "wide",    "green",
    "grey",    "red",    "dark",    "careful",  "tired",    "young",   "kind",   "strange", "empty",  "broken",
    "new",     "long",   "short",   "clean",    "dusty",    "wooden",  "silver", "golden", "soft",    "rough",
    "crooked", "gentle", "patient", "cheerful", "sleepy",   "curious", "brave",  "proud",  "shy",     "honest",
    "bitter",  "sweet",  "wet",     "dry",      "familiar", "distant", "hidden", "famous", "ordinary", "pale"};
inline constexpr std::string_view character_adjectives[] = {
    "careful", "tired",  "young",    "kind",    "patient", "cheerful", "sleepy", "curious",
    "brave",   "proud",  "shy",      "honest",  "quiet",   "clever",   "stubborn", "generous",
    "anxious", "calm",   "restless", "polite",  "serious", "hopeful",  "lonely", "busy"};
inline constexpr std::string_view jobs[] = {
    "miller", "baker",  "teacher", "carpenter", "fisherman", "doctor", "shepherd", "blacksmith",
    "farmer", "weaver", "painter", "clerk",     "sailor",    "cook",   "gardener", "postman",
    "nurse",  "potter", "tailor",  "innkeeper", "mason",     "lamplighter", "stationmaster", "beekeeper"};
inline constexpr std::string_view carry_verbs[] = {
    "carried", "found",   "opened", "closed",  "mended",  "painted", "lifted",  "sold",    "bought",  "counted",
    "cleaned", "wrapped", "hid",    "dropped", "borrowed", "returned", "polished", "moved", "fixed",   "weighed",
    "packed",  "emptied", "filled", "tied",    "dried",   "checked", "locked",  "unlocked", "guarded", "shared"};
inline constexpr std::string_view still_verbs[] = {
    "waited",  "laughed", "slept",  "listened", "worked",  "rested", "smiled",   "sang",    "whistled", "sighed",
    "nodded",  "paused",  "stayed", "read",     "thought", "prayed", "shivered", "yawned",  "hummed",   "wrote"};
inline constexpr std::string_view go_verbs[] = {"walked to", "ran to",    "went down to", "climbed up to",
                                                "drove to",  "rode to",   "hurried to",   "wandered to",
                                                "came back to", "set out for", "cycled to", "crossed over to"};
inline constexpr std::string_view times[] = {
    "In the morning",   "At noon",           "Later that day",  "Before dawn",        "In the spring",
    "On the third day", "After supper",      "When the rain stopped", "Early on Monday", "By the evening",
    "That winter",      "Around midnight",   "At first light",  "On Sunday",          "A week later",
    "In the autumn",    "Just after six",    "Before the harvest", "During the storm", "At the end of the summer"};
inline constexpr std::string_view feelings[] = {"glad",     "worried", "tired",   "surprised", "hopeful",
                                                "uneasy",   "proud",   "curious", "relieved",  "sad",
                                                "grateful", "puzzled", "calm",    "nervous",   "happy"};
inline constexpr std::string_view weather[] = {
    "The wind was cold and smelled of salt.",
    "Rain fell all afternoon, and the roads turned to mud.",
    "The sky was clear and very blue.",
    "A thin fog lay over the fields until noon.",
    "Snow covered the roofs, and the chimneys smoked.",
    "It was the warmest day of the year.",
    "Clouds came in from the west before evening.",
    "The frost was hard, and the ponds were frozen.",
    "A soft rain began just as the lamps were lit.",
    "The leaves were turning yellow along the lane.",
    "Thunder rolled somewhere beyond the hills.",
    "The air was still, and every sound carried far."};
inline constexpr std::string_view sounds[] = {"a bell ringing", "a dog barking",  "the wind in the trees",
                                              "children singing", "a cart on the stones", "the river running",
                                              "someone knocking", "a train whistle", "rain on the roof",
                                              "geese overhead",   "a door closing",  "footsteps in the hall"};
inline constexpr std::string_view foods[] = {"bread", "cheese", "apples", "soup",   "honey",   "pears",
                                             "eggs",  "milk",   "plums",  "butter", "carrots", "tea",
                                             "cake",  "beans",  "onions", "potatoes"};
inline constexpr std::string_view number_words[] = {"two",   "three", "four",   "five",   "six",     "seven",
                                                    "eight", "nine",  "ten",    "eleven", "twelve",  "twenty"};
inline constexpr std::string_view months[] = {"January", "February", "March",     "April",   "May",      "June",
                                              "July",    "August",   "September", "October", "November", "December"};
inline constexpr std::string_view connectives[] = {"Then", "After that", "Soon", "Meanwhile", "At last", "Still",
                                                   "So",   "Even so",    "Of course", "Before long"};
inline constexpr std::string_view sayings[] = {
    "A quiet river still reaches the sea.",
    "The early bird finds the bread still warm.",
    "Every road in the valley leads home.",
    "You cannot mend a net with wet hands.",
    "A shared loaf lasts longer.",
    "The hill is never as steep as it looks from below.",
    "Count the sheep before you sell the wool.",
    "Old bridges carry the heaviest carts."};
inline constexpr std::string_view roman[] = {"I",    "II",  "III",  "IV",   "V",   "VI",   "VII",
                                             "VIII", "IX",  "X",    "XI",   "XII", "XIII", "XIV",
                                             "XV",   "XVI", "XVII", "XVIII", "XIX", "XX"};

/// Builds the text: keeps the Rng and the current chapter's cast.
class Writer {
 public:
  explicit Writer(std::uint64_t seed) : rng_(seed) {}

  std::string run(std::size_t bytes) {
    out_.reserve(bytes + 4096);
    out_ += "THE VALLEY CHRONICLE\n\nBeing an account of ordinary days in the towns of the Long Valley, written down "
            "so that they would not be forgotten.\n\n";
    while (out_.size() < bytes) chapter();
    out_.resize(bytes);
    return std::move(out_);
  }

 private:
  std::string_view pick(Words words) { return words[std::size_t(rng_.uniform_index(words.size()))]; }
  bool chance(double p) { return rng_.uniform() < p; }
  std::size_t between(std::size_t lo, std::size_t hi) { return lo + std::size_t(rng_.uniform_index(hi - lo + 1)); }

  static std::string cap(std::string_view s) {
    std::string r(s);
    if (!r.empty() && r[0] >= 'a' && r[0] <= 'z') r[0] = char(r[0] - 'a' + 'A');
    return r;
  }
  static std::string plural(std::string_view noun) {
    std::string s(noun);
    if (s == "knife") return "knives";
    if (s == "loaf") return "loaves";
    if (s == "scarf") return "scarves";
    if (s == "shelf") return "shelves";
    if (s == "sheep") return "sheep";
    if (s == "mouse") return "mice";
    if (s == "goose") return "geese";
    if (s == "box") return "boxes";
    if (s.ends_with("ch") || s.ends_with("sh")) return s + "es";
    return s + "s";
  }

  // The chapter's cast: a few people, a town, a favourite place.
  struct Person {
    std::string name;
    std::string job;
    std::string trait;
    bool she = false;
  };
  Person person() {
    Person p;
    const std::size_t i = std::size_t(rng_.uniform_index(std::size(first_names)));
    p.name = std::string(first_names[i]);
    if (chance(0.5)) p.name += " " + std::string(pick(family_names));
    // The list alternates roughly; decide the pronoun from a fixed table of the names above.
    static constexpr bool female[] = {true,  false, true,  false, true,  false, true,  false, true,  false,
                                      true,  false, true,  false, true,  false, true,  false, false, true,
                                      false, false, true,  false, true,  false, true,  false, true,  false,
                                      true,  false, true,  false, false, true,  false, true,  false, true};
    p.she = female[i];
    p.job = std::string(pick(jobs));
    p.trait = std::string(pick(character_adjectives));
    return p;
  }
  const Person& someone() { return cast_[std::size_t(rng_.uniform_index(cast_.size()))]; }
  const Person& someone_else(const Person& p) {
    const Person* q = &someone();
    while (q == &p) q = &someone();
    return *q;
  }
  std::string short_name(const Person& p) { return p.name.substr(0, p.name.find(' ')); }
  const char* he(const Person& p) { return p.she ? "she" : "he"; }
  const char* his(const Person& p) { return p.she ? "her" : "his"; }

  std::string thing() {
    if (chance(0.5)) return "the " + std::string(pick(adjectives)) + " " + std::string(pick(objects));
    return "the " + std::string(pick(objects));
  }
  std::string where() {
    if (chance(0.35)) return std::string(favourite_);
    return std::string(pick(places));
  }
  std::string some_number() {
    if (chance(0.6)) return std::string(pick(number_words));
    return std::to_string(2 + rng_.uniform_index(97));
  }

  void chapter() {
    ++chapter_;
    cast_.clear();
    const std::size_t people = between(3, 5);
    for (std::size_t i = 0; i < people; ++i) cast_.push_back(person());
    town_ = pick(towns);
    favourite_ = pick(places);
    const std::string title = chapter_ <= std::size(roman) ? std::string(roman[chapter_ - 1]) : std::to_string(chapter_);
    out_ += "CHAPTER " + title + ". " + cap(std::string(favourite_).substr(4)) + " at " + std::string(town_) + "\n\n";
    const Person& hero = cast_[0];
    out_ += "In " + std::string(pick(months)) + " of that year " + hero.name + ", the " + hero.job + ", lived in " +
            std::string(town_) + ", not far from " + std::string(favourite_) + ". Everyone agreed that " +
            std::string(he(hero)) + " was " + hero.trait + ".\n\n";
    const std::size_t paragraphs = between(18, 34);
    for (std::size_t i = 0; i < paragraphs; ++i) {
      const double r = rng_.uniform();
      if (r < 0.42)
        narration();
      else if (r < 0.72)
        dialogue();
      else if (r < 0.88)
        description();
      else if (r < 0.96)
        list_paragraph();
      else
        saying();
    }
    out_ += "\n";
  }

  void sentence_narrative() {
    const Person& p = someone();
    const Person& q = someone_else(p);
    const std::string name = chance(0.7) ? short_name(p) : p.name;
    switch (rng_.uniform_index(14)) {
      case 0: out_ += std::string(pick(times)) + ", " + name + " " + std::string(pick(go_verbs)) + " " + where() + "."; break;
      case 1: out_ += cap(name) + " " + std::string(pick(carry_verbs)) + " " + thing() + " and put it by " + where() + "."; break;
      case 2: out_ += cap(name) + " " + std::string(pick(still_verbs)) + " for a while, because " + he(p) + " was " + std::string(pick(feelings)) + "."; break;
      case 3: out_ += "The " + p.job + " " + std::string(pick(carry_verbs)) + " " + thing() + " for " + short_name(q) + "."; break;
      case 4: out_ += std::string(pick(connectives)) + " " + name + " heard " + std::string(pick(sounds)) + " near " + where() + "."; break;
      case 5: out_ += cap(name) + " had " + some_number() + " " + plural(pick(objects)) + " and only one " + std::string(pick(objects)) + "."; break;
      case 6: out_ += "When " + short_name(p) + " reached " + where() + ", " + short_name(q) + " was already there with " + his(q) + " " + std::string(pick(animals)) + "."; break;
      case 7: out_ += cap(his(p)) + " " + std::string(pick(animals)) + " followed " + (p.she ? "her" : "him") + " all the way to " + where() + "."; break;
      case 8: out_ += std::string(pick(times)) + " the " + std::string(pick(animals)) + " got into " + where() + ", and " + short_name(p) + " had to chase it out."; break;
      case 9: out_ += cap(name) + " wrote a letter to " + q.name + " about " + thing() + "."; break;
      case 10: out_ += "Nobody in " + std::string(town_) + " knew who had left " + thing() + " at " + where() + "."; break;
      case 11: out_ += cap(name) + " was " + std::string(pick(feelings)) + " to see that " + thing() + " was still there."; break;
      case 12: out_ += "It took " + short_name(p) + " " + some_number() + " minutes to walk from " + std::string(pick(places)) + " to " + where() + "."; break;
      default: out_ += std::string(pick(connectives)) + ", " + short_name(p) + " and " + short_name(q) + " " + std::string(pick(go_verbs)) + " " + where() + " together."; break;
    }
  }

  void narration() {
    const std::size_t n = between(3, 7);
    for (std::size_t i = 0; i < n; ++i) {
      if (i > 0) out_ += ' ';
      sentence_narrative();
    }
    out_ += "\n\n";
  }

  std::string question() {
    switch (rng_.uniform_index(8)) {
      case 0: return "Where is " + thing() + "?";
      case 1: return "Have you been to " + where() + " today?";
      case 2: return "Why are you so " + std::string(pick(feelings)) + "?";
      case 3: return "Who left " + thing() + " by " + where() + "?";
      case 4: return "How many " + plural(pick(objects)) + " do we need?";
      case 5: return "Will you help me carry " + thing() + "?";
      case 6: return "Did you hear " + std::string(pick(sounds)) + "?";
      default: return "What time does " + std::string(pick(places)).substr(4) + " open?";
    }
  }
  std::string answer() {
    switch (rng_.uniform_index(8)) {
      case 0: return "It is at " + where() + ", where it always is.";
      case 1: return "I think " + short_name(someone()) + " has it.";
      case 2: return "We need " + some_number() + ", or perhaps a few more.";
      case 3: return chance(0.5) ? "Not yet, but I will go soon." : "Not yet, but I will go after supper.";
      case 4: return "Yes, and it was very " + std::string(pick(adjectives)) + ".";
      case 5: return "I am only " + std::string(pick(feelings)) + ", that is all.";
      case 6: return "Ask the " + std::string(pick(jobs)) + "; " + "they will know.";
      default: return "No. " + std::string(pick(sayings));
    }
  }
  void dialogue() {
    const std::size_t n = between(2, 5);
    for (std::size_t i = 0; i < n; ++i) {
      const Person& p = someone();
      const bool ask = i % 2 == 0;
      const std::string line = ask ? question() : answer();
      const std::string verb = ask ? (chance(0.5) ? "asked" : "said") : (chance(0.5) ? "said" : "replied");
      if (chance(0.5)) {
        // "It is here," said Anna. — a statement before its speaker ends with a comma.
        const std::string quoted = line.back() == '.' ? line.substr(0, line.size() - 1) + "," : line;
        out_ += "\"" + quoted + "\" " + verb + " " + short_name(p) + ".";
      } else {
        out_ += cap(short_name(p)) + " " + verb + ", \"" + line + "\"";
      }
      out_ += chance(0.6) ? "\n" : " ";
    }
    out_ += "\n";
  }

  void description() {
    out_ += std::string(pick(weather));
    const std::size_t n = between(2, 4);
    for (std::size_t i = 0; i < n; ++i) {
      switch (rng_.uniform_index(5)) {
        case 0: out_ += " The " + std::string(pick(places)).substr(4) + " of " + std::string(town_) + " looked " + std::string(pick(adjectives)) + " and " + std::string(pick(adjectives)) + "."; break;
        case 1: out_ += " From " + where() + " one could see " + std::string(pick(places)) + " and, further off, the hills."; break;
        case 2: out_ += " There were " + some_number() + " " + plural(pick(animals)) + " in the field by " + where() + "."; break;
        case 3: out_ += " Somewhere there was " + std::string(pick(sounds)) + "."; break;
        default: out_ += " " + cap(thing()) + " stood by the door of " + where() + "."; break;
      }
    }
    out_ += "\n\n";
  }

  void list_paragraph() {
    const Person& p = someone();
    out_ += cap(short_name(p)) + " made a list before going to the market in " + std::string(town_) + ": ";
    const std::size_t n = between(3, 6);
    for (std::size_t i = 0; i < n; ++i) {
      if (i > 0) out_ += i + 1 == n ? " and " : ", ";
      out_ += some_number() + " pounds of " + std::string(pick(foods));
    }
    out_ += ". The bill came to " + std::to_string(1 + rng_.uniform_index(40)) + " shillings and " +
            std::to_string(rng_.uniform_index(12)) + " pence.\n\n";
  }

  void saying() {
    const Person& p = someone();
    out_ += "As the " + p.job + " used to say, \"" + std::string(pick(sayings)) + "\"\n\n";
  }

  memoryformer::Rng rng_;
  std::string out_;
  std::size_t chapter_ = 0;
  std::vector<Person> cast_;
  std::string_view town_;
  std::string_view favourite_;
};

}  // namespace text_detail

/// The built-in text: `bytes` bytes (default 1,000,000) of English prose, the same for a given seed on every machine.
inline std::string default_text(std::size_t bytes = 1000000, std::uint64_t seed = 2024) {
  return text_detail::Writer(seed).run(bytes);
}

}  // namespace memoryformer_examples
