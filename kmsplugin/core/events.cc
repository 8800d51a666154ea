#include "kmsplugin/core/events.h"

namespace kmsplugin::core {

EventSink& NullEventSink() {
  class Null final : public EventSink {
   public:
    void Emit(const SourceEvent&) override {}
  };
  static Null* sink = new Null();
  return *sink;
}

}  // namespace kmsplugin::core
