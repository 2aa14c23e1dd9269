// SPDX-License-Identifier: MIT
// TableSharding: how a table-parallel run splits the bucket tables of every Memory Layer across its ranks (design §11.3).
#pragma once

#include <string>

#include "../detail/checks.hpp"
#include "../types.hpp"
#include "communicator.hpp"

namespace memoryformer {

/// A contiguous range [begin, end) of a Memory Layer's K tables.
struct TableRange {
  Index begin = 0;  ///< first table
  Index end = 0;    ///< one past the last table
  Index size() const { return end - begin; }
};

/**
 * @brief The tables rank `rank` of `ranks` owns in a layer of `tables` tables: [⌊K·r/R⌋, ⌊K·(r+1)/R⌋), so the
 *        ranges tile 0 … K−1 in rank order and differ in size by at most one.
 * @throws ConfigError when K < R (a rank would own no table) or the rank is outside [0, R)
 */
inline TableRange owned_tables(Index tables, int rank, int ranks, std::string_view where = "owned_tables") {
  detail::check_config(ranks >= 1 && rank >= 0 && rank < ranks, where,
                       "rank " + std::to_string(rank) + " is outside [0, " + std::to_string(ranks) + ")");
  detail::check_config(tables >= ranks, where,
                       "a layer of " + std::to_string(tables) + " tables cannot be split over " +
                           std::to_string(ranks) + " ranks (every rank must own at least one table)");
  return {tables * rank / ranks, tables * (rank + 1) / ranks};
}

/**
 * @brief Table parallelism for the Memory Layers of a layer, block or model: with a communicator, each rank keeps
 *        only its owned_tables() of every Memory Layer (parameters, gradients and so the optimiser state), and the
 *        layers exchange codes, partial outputs and gradients with the other ranks in forward and backward.
 *        Without one (the default) every layer keeps all its tables.
 *
 * A sharded layer's forward and backward are collective (see Communicator): every rank calls them in the same order,
 * each with its own rows (its share of the batch). The communicator must outlive the layers.
 */
struct TableSharding {
  Communicator* communicator = nullptr;  ///< the ranks sharing the tables; nullptr: no sharding
  bool active() const { return communicator != nullptr; }
};

}  // namespace memoryformer
