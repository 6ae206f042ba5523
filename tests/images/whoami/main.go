// whoami is shoal's test workload: a tiny HTTP server that says which replica it is.
//
// It listens on $PORT (default 8080) and answers:
//
//	GET /          "<name>\n", name = $SHOAL_REPLICA if set, else the hostname
//	               (in Docker, the container id prefix)
//	GET /healthz   200 "ok", or 500 "failing" once /fail was called
//	GET /fail      makes /healthz fail from now on
//	GET /recover   makes /healthz pass again
//	GET /exit      answers, then exits with status 1 (a crash)
//	GET /env?key=K the value of environment variable K ("" if unset)
//	GET /args      the command-line arguments after argv[0], one per line
//
// It exits 0 on SIGTERM or SIGINT. That matters in a container: as PID 1 a process
// without a handler ignores SIGTERM, and every `docker stop` would wait for SIGKILL.
package main

import (
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	name := os.Getenv("SHOAL_REPLICA")
	if name == "" {
		h, err := os.Hostname()
		if err != nil {
			h = "unknown"
		}
		name = h
	}

	var failing atomic.Bool
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprintf(w, "%s\n", name)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		if failing.Load() {
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprintln(w, "failing")
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/fail", func(w http.ResponseWriter, r *http.Request) {
		failing.Store(true)
		fmt.Fprintln(w, "healthz will fail from now on")
	})
	mux.HandleFunc("/recover", func(w http.ResponseWriter, r *http.Request) {
		failing.Store(false)
		fmt.Fprintln(w, "healthz passes again")
	})
	mux.HandleFunc("/exit", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "exiting with status 1")
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		go func() {
			// Let the answer leave before the process goes.
			time.Sleep(50 * time.Millisecond)
			fmt.Println("whoami: exiting with status 1 on request")
			os.Exit(1)
		}()
	})
	mux.HandleFunc("/env", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, os.Getenv(r.URL.Query().Get("key")))
	})
	mux.HandleFunc("/args", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, strings.Join(os.Args[1:], "\n"))
		if len(os.Args) > 1 {
			fmt.Fprintln(w)
		}
	})
	logged := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Printf("whoami: %s %s\n", r.Method, r.URL.RequestURI())
		mux.ServeHTTP(w, r)
	})

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-signals
		fmt.Printf("whoami: %v received, exiting\n", s)
		os.Exit(0)
	}()

	fmt.Printf("whoami: %s listening on :%s args=%q\n", name, port, os.Args[1:])
	if err := http.ListenAndServe(":"+port, logged); err != nil {
		fmt.Fprintf(os.Stderr, "whoami: %v\n", err)
		os.Exit(2)
	}
}
