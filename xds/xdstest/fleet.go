// Package xdstest simulates many ADS clients for benchmarks of the xDS
// control plane: each client subscribes to one resource type and ACKs every
// response, and the fleet reports when each client ACKed what.
package xdstest

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
)

// Ack is one client's acknowledgement of one response.
type Ack struct {
	Client  int
	Version string
	At      time.Time
}

// Fleet is a set of simulated ADS clients sharing a few connections.
type Fleet struct {
	N    int
	acks chan Ack
	// version is each client's last ACKed version, so that only an ACK
	// of another version counts as having the change.
	version map[int]string
	conns   []*grpc.ClientConn
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

// Options describe a fleet. Clients share connections PerConn at a time
// (HTTP/2 streams), as a real fleet would not, but a benchmark on one
// machine must save file descriptors.
type Options struct {
	N       int
	PerConn int
	Dial    func() (*grpc.ClientConn, error)
	Node    func(i int) *corev3.Node
	TypeURL string
	Names   []string
}

// Start connects the fleet and sends every client's first request.
func Start(ctx context.Context, o Options) (*Fleet, error) {
	if o.PerConn <= 0 {
		o.PerConn = 50
	}
	ctx, cancel := context.WithCancel(ctx)
	f := &Fleet{N: o.N, acks: make(chan Ack, o.N*4), version: map[int]string{}, cancel: cancel}
	for i := range o.N {
		if i%o.PerConn == 0 {
			cc, err := o.Dial()
			if err != nil {
				f.Close()
				return nil, err
			}
			f.conns = append(f.conns, cc)
		}
		stream, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(f.conns[len(f.conns)-1]).StreamAggregatedResources(ctx)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("client %d: %w", i, err)
		}
		if err := stream.Send(&discoverygrpc.DiscoveryRequest{Node: o.Node(i), TypeUrl: o.TypeURL, ResourceNames: o.Names}); err != nil {
			f.Close()
			return nil, fmt.Errorf("client %d: %w", i, err)
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			for {
				r, err := stream.Recv()
				if err != nil {
					return
				}
				if err := stream.Send(&discoverygrpc.DiscoveryRequest{TypeUrl: o.TypeURL, ResourceNames: o.Names, VersionInfo: r.VersionInfo, ResponseNonce: r.Nonce}); err != nil {
					return
				}
				select {
				case f.acks <- Ack{Client: i, Version: r.VersionInfo, At: time.Now()}:
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	return f, nil
}

// WaitFirst waits until every client has ACKed a first response.
func (f *Fleet) WaitFirst(timeout time.Duration) error {
	seen := map[int]bool{}
	deadline := time.After(timeout)
	for len(seen) < f.N {
		select {
		case a := <-f.acks:
			seen[a.Client] = true
			f.version[a.Client] = a.Version
		case <-deadline:
			return fmt.Errorf("only %d of %d clients got their first config in %v", len(seen), f.N, timeout)
		}
	}
	return nil
}

// Latencies waits until every client has ACKed a new version (one it had
// not ACKed last) after start and returns each client's delay in
// milliseconds, sorted.
func (f *Fleet) Latencies(start time.Time, timeout time.Duration) ([]float64, error) {
	got := map[int]time.Duration{}
	deadline := time.After(timeout)
	for len(got) < f.N {
		select {
		case a := <-f.acks:
			if _, ok := got[a.Client]; !ok && a.At.After(start) && a.Version != f.version[a.Client] {
				got[a.Client] = a.At.Sub(start)
				f.version[a.Client] = a.Version
			}
		case <-deadline:
			return nil, fmt.Errorf("only %d of %d clients got the change in %v", len(got), f.N, timeout)
		}
	}
	lat := make([]float64, 0, f.N)
	for _, d := range got {
		lat = append(lat, float64(d.Microseconds())/1000)
	}
	slices.Sort(lat)
	return lat, nil
}

// Close ends every stream and connection.
func (f *Fleet) Close() {
	f.cancel()
	for _, c := range f.conns {
		c.Close()
	}
	f.wg.Wait()
}

// Summary gathers per-iteration percentiles of Latencies.
type Summary struct{ p50, p99, max []float64 }

// Add records one iteration's sorted latencies.
func (s *Summary) Add(lat []float64) {
	n := len(lat)
	s.p50 = append(s.p50, lat[n/2])
	s.p99 = append(s.p99, lat[min(n-1, n*99/100)])
	s.max = append(s.max, lat[n-1])
}

// Report returns the medians of p50 and p99 over the iterations and the
// largest latency seen, in milliseconds.
func (s *Summary) Report() (p50, p99, maxMS float64) {
	return median(s.p50), median(s.p99), slices.Max(s.max)
}

func median(v []float64) float64 {
	v = slices.Clone(v)
	slices.Sort(v)
	return v[len(v)/2]
}
