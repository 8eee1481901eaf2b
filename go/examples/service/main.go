// Command service is a small HTTP service in front of tensord: the shape of a real one.
// It shares ONE shmclient.Client between all requests; it may start before the daemon
// (the Client connects in the background) and reconnects by itself when the daemon
// restarts; each HTTP request's deadline bounds its call (and its wait for a session),
// errors map to HTTP statuses with shmclient.HTTPStatus, /healthz is built on
// Client.Health, and SIGINT or SIGTERM stops it cleanly: in-flight HTTP requests finish,
// then the Client says goodbye.
//
//	go run ./examples/service [-addr 127.0.0.1:8080] [-socket PATH]
//	curl -s localhost:8080/healthz
//	curl -s -d '{"x": [[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]]}' localhost:8080/infer
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/tensord/tensord/go/shmclient"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8080", "HTTP listen address")
	socket := flag.String("socket", "", "daemon socket (default: $TENSORD_SOCKET, /run/tensord/tensord.sock or /tmp/tensord.sock)")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	c, err := shmclient.Dial(dctx, *socket, shmclient.WithName("service"),
		shmclient.WithRetryOnFailedConnect(true), // the daemon may start after this service
		shmclient.WithRetry(true),                // retry OVERLOADED and draining refusals
		shmclient.WithDisconnectHandler(func(err error) { log.Printf("tensord: %v; reconnecting", err) }),
		shmclient.WithReconnectHandler(func() { log.Print("tensord: reconnected") }))
	cancel()
	if err != nil {
		log.Fatalf("service: %v", err)
	}
	defer c.Close()

	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { healthz(c, w, r) })
	mux.HandleFunc("POST /infer", func(w http.ResponseWriter, r *http.Request) { infer(c, w, r) })
	srv := &http.Server{Addr: *addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	log.Printf("service: listening on %s (daemon connected: %v)", *addr, c.Connected())
	if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		log.Fatalf("service: %v", err)
	}
	log.Print("service: stopped")
}

// healthz is ready when the daemon is: 503 while it drains, is stuck, or is away.
func healthz(c *shmclient.Client, w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), time.Second)
	defer cancel()
	h, err := c.Health(ctx)
	switch {
	case err != nil:
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
	case !h.Ready:
		http.Error(w, h.Reason, http.StatusServiceUnavailable)
	default:
		w.Write([]byte("ok\n"))
	}
}

// infer runs rows of 16 numbers through the built-in mlp: {"x": [[...16]]} → {"y": [[...4]]}.
func infer(c *shmclient.Client, w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	var in struct{ X [][]float32 }
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&in); err != nil {
		http.Error(w, "body: "+err.Error(), http.StatusBadRequest)
		return
	}
	x := make([]float32, 0, 16*len(in.X))
	for _, row := range in.X {
		if len(row) != 16 {
			http.Error(w, "every row of x has 16 numbers", http.StatusBadRequest)
			return
		}
		x = append(x, row...)
	}
	out, err := c.Infer(ctx, "mlp", shmclient.FromFloat32("x", []int64{int64(len(in.X)), 16}, x))
	if err != nil {
		// 400 bad input, 429 overloaded, 503 no daemon, 504 deadline, 500 the model failed
		http.Error(w, err.Error(), shmclient.HTTPStatus(err))
		return
	}
	t, err := out.Get("y")
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	y, err := t.AsFloat32s()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	rows := make([][]float32, len(in.X))
	for i := range rows {
		rows[i] = y[i*4 : (i+1)*4]
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"y": rows})
}
